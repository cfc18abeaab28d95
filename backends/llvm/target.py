"""The host JIT target: llvmlite initialisation, target machine, O3 pipeline and code library.

One ``HostTarget`` per process (``host_target()``) owns

* the llvmlite binding initialisation (native target + asm printer, done once; since llvmlite
  0.45 ``llvm.initialize()`` raises, so it is never called);
* the host ``TargetMachine``: the CPU name and feature string LLVM reports for this machine
  (e.g. ``znver5`` with ``+avx512f,...``), opt level 3, JIT code model;
* the new-pass-manager ``default<O3>`` module pipeline built from that machine;
* one MCJIT ``ExecutionEngine`` that every compiled module is added to.

``HostTarget.compile(module, key=...)`` is the code-library API: it stamps the module with the
host triple and data layout, parses and verifies it, optimises it, generates a relocatable object
(``emit_object``), adds that object to the engine and returns a ``CompiledModule`` from which
function addresses (or ctypes callables), the object code, the optimised LLVM IR text and the
assembly text can be read. ``HostTarget.load_object(key, ...)`` adds object code generated
earlier (the on-disk cache, ``cache.py``) without running LLVM. Both paths go through the same
``add_object_file``, so cached and fresh code are loaded alike.

Keys: a module compiled or loaded under a ``key`` is remembered; asking again for the same key
returns the module already in the engine (its symbols are content-addressed by the key, so
adding it twice would redefine them). ``llvm_runs`` counts O3 + code generation runs, which lets
tests check that a cache hit ran no LLVM.

Relocatable code: a lowering may call another JIT'd function by its address (``inttoptr i64
<address>``, e.g. the packed SGEMM kernels). ``compile`` rewrites every such call target that is a
function this target JIT'd into a reference to its symbol, so the object code holds a relocation
instead of a process-specific address; ``CompiledModule.dependencies`` names the modules it
links against (the cache stores their object code too), and ``relocatable`` is False if an
absolute address remains (such a module is never cached). A module loaded by ``load_object``
stands in for a later ``compile`` of a module of the same name and symbols (those names are
content-derived, and the cache key covers the generators' sources).

Invariants: compiled code is never freed while the process lives (the engine owns every
module, and callers keep raw function addresses); an external symbol name is defined by at most
one compiled module (a second definition raises ``LLVMCodegenError``); compilation is
serialised by a lock so that threads may compile concurrently.
"""

from __future__ import annotations

import ctypes
import platform
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import llvmlite.binding as llvm
from llvmlite import ir

from graphc.errors import GraphcError


class LLVMCodegenError(GraphcError):
    """Generated LLVM IR failed to parse or verify, or redefines a JIT'd symbol.

    The message carries LLVM's own diagnostic text.
    """


@dataclass
class CompiledModule:
    """One module after verification, O3 and JIT: symbols, object code, IR and assembly.

    The IR texts may be given as loaders (callables), read on first use: a module loaded from
    the cache reads its IR files only if someone asks for them."""

    name: str
    addresses: dict[str, int]      # external function name -> address in this process
    object_code: bytes = field(repr=False)
    _source: str | Callable[[], str] = field(repr=False)
    _optimised: str | Callable[[], str] = field(repr=False)
    _target: HostTarget = field(repr=False)
    _assembly: str | None = field(default=None, repr=False)
    key: str | None = None
    dependencies: tuple = ()       # CompiledModules whose symbols this one references
    relocatable: bool = True       # no absolute address of this process in the code

    @property
    def source_ir(self) -> str:
        """The IR as generated, before optimisation."""
        if callable(self._source):
            self._source = self._source()
        return self._source

    @property
    def optimised_ir(self) -> str:
        """The IR after the O3 pipeline (what was compiled to machine code)."""
        if callable(self._optimised):
            self._optimised = self._optimised()
        return self._optimised

    def address(self, function: str) -> int:
        try:
            return self.addresses[function]
        except KeyError:
            raise LLVMCodegenError(
                f"module '{self.name}' defines no function '{function}'; it defines "
                f"{', '.join(sorted(self.addresses)) or 'none'}") from None

    def ctypes_function(self, function: str, restype, *argtypes):
        """A ctypes callable for ``function`` (ctypes releases the GIL during the call)."""
        return ctypes.CFUNCTYPE(restype, *argtypes)(self.address(function))

    @property
    def assembly(self) -> str:
        """Host assembly of the optimised module (emitted on first request)."""
        if self._assembly is None:
            self._assembly = self._target.emit_assembly(self.optimised_ir)
        return self._assembly


class HostTarget:
    """The host CPU as an LLVM target, with its O3 pipeline and one MCJIT engine."""

    def __init__(self, speed_level: int = 3):
        _initialise_llvm()
        self.triple = llvm.get_process_triple()
        self.cpu = llvm.get_host_cpu_name()
        self.features = llvm.get_host_cpu_features().flatten()
        self.speed_level = speed_level
        target = llvm.Target.from_triple(self.triple)
        self.target_machine = target.create_target_machine(
            cpu=self.cpu, features=self.features, opt=speed_level, codemodel="jitdefault",
            jit=True)
        self.data_layout = str(self.target_machine.target_data)
        self._lock = threading.Lock()
        self._defined: dict[str, str] = {}  # external symbol -> module that defined it
        self._by_key: dict[str, CompiledModule] = {}  # cache key -> module already loaded
        self._modules: dict[str, CompiledModule] = {}  # external symbol -> its module
        self._symbol_at: dict[int, str] = {}  # address -> external symbol JIT'd there
        self._loaded_names: dict[str, CompiledModule] = {}  # name -> module from load_object
        self.llvm_runs = 0  # O3 + code generation runs (a cache hit adds none)
        # MCJIT needs a module to start from; an empty one stamped for the host
        self._engine = llvm.create_mcjit_compiler(self._parse(self._empty_module()),
                                                  self.target_machine)

    def __repr__(self) -> str:
        return f"<HostTarget {self.triple} cpu={self.cpu} O{self.speed_level}>"

    def has_feature(self, name: str) -> bool:
        """Whether the host feature string enables ``name`` (e.g. ``"avx512f"``)."""
        return f"+{name}" in self.features.split(",")

    # -- the stages ------------------------------------------------------------------------------
    def stamp(self, module: ir.Module) -> ir.Module:
        """Give ``module`` the host triple and data layout (so LLVM optimises for this CPU)."""
        module.triple = self.triple
        module.data_layout = self.data_layout
        return module

    def optimise(self, mod: llvm.ModuleRef) -> None:
        """Run the new pass manager's default O<speed_level> module pipeline in place."""
        pto = llvm.create_pipeline_tuning_options(speed_level=self.speed_level)
        pto.loop_vectorization = True
        pto.slp_vectorization = True
        pass_builder = llvm.create_pass_builder(self.target_machine, pto)
        pass_builder.getModulePassManager().run(mod, pass_builder)

    def emit_assembly(self, ir_text: str) -> str:
        """Host assembly for LLVM IR text (parsed afresh, so JIT'd modules stay untouched)."""
        with self._lock:
            return self.target_machine.emit_assembly(self._parse(ir_text))

    def loaded(self, key: str) -> CompiledModule | None:
        """The module already loaded under ``key`` in this process, if any."""
        with self._lock:
            return self._by_key.get(key)

    def compile(self, module: ir.Module, key: str | None = None) -> CompiledModule:
        """Verify, optimise and JIT ``module``; the code lives as long as the process.

        With a ``key`` already loaded, the loaded module is returned and LLVM does not run."""
        self.stamp(module)
        with self._lock:
            if key is not None and key in self._by_key:
                return self._by_key[key]
            dependencies = self._link_by_symbol(module)
            source = str(module)
            mod = self._parse(source, module.name)
            externals = self._external_functions(mod)
            stand_in = self._loaded_names.get(module.name)
            if stand_in is not None and sorted(stand_in.addresses) == sorted(externals):
                return stand_in
            self._check_new_symbols(module.name, externals)
            self.optimise(mod)
            self._verify(mod, module.name, "after optimisation")
            optimised = str(mod)
            object_code = self.target_machine.emit_object(mod)
            self.llvm_runs += 1
            compiled = self._add_object(module.name, key, object_code, externals, source,
                                        optimised)
            compiled.dependencies = dependencies
            compiled.relocatable = not _ABSOLUTE_ADDRESS.search(source) and all(
                d.relocatable for d in dependencies)
            return compiled

    def _link_by_symbol(self, module: ir.Module) -> tuple:
        """Turn ``inttoptr i64 <address of a JIT'd function>`` into a bitcast of a declaration
        of that function's symbol; the modules defining them."""
        used: dict[str, CompiledModule] = {}
        for function in module.functions:
            for block in function.blocks:
                for instr in block.instructions:
                    symbol = self._called_symbol(instr)
                    if symbol is None:
                        continue
                    declared = module.globals.get(symbol) or ir.Function(
                        module, instr.type.pointee, symbol)
                    instr.opname, instr.operands = "bitcast", [declared]
                    used[symbol] = self._modules[symbol]
        return tuple({id(m): m for m in used.values()}.values())

    def _called_symbol(self, instr) -> str | None:
        if not (isinstance(instr, ir.CastInstr) and instr.opname == "inttoptr"):
            return None
        value = instr.operands[0]
        if not isinstance(value, ir.Constant) or not isinstance(value.constant, int):
            return None
        if not isinstance(getattr(instr.type, "pointee", None), ir.FunctionType):
            return None
        return self._symbol_at.get(value.constant)

    def load_object(self, key: str, name: str, object_code: bytes, externals: list[str],
                    source_ir: str | Callable[[], str],
                    optimised_ir: str | Callable[[], str]) -> CompiledModule:
        """Add object code made by ``compile`` earlier (maybe in another process) under ``key``;
        a module already loaded under ``key`` is returned instead."""
        with self._lock:
            if key in self._by_key:
                return self._by_key[key]
            if externals and all(f in self._defined for f in externals):
                # already JIT'd here under another key (same content-derived names)
                return self._modules[externals[0]]
            self._check_new_symbols(name, externals)
            compiled = self._add_object(name, key, object_code, externals, source_ir,
                                        optimised_ir)
            self._loaded_names[name] = compiled
            return compiled

    def _add_object(self, name, key, object_code, externals, source, optimised) -> CompiledModule:
        """Add an object file to the engine and resolve its symbols (caller holds the lock)."""
        self._engine.add_object_file(llvm.ObjectFileRef.from_data(object_code))
        self._engine.finalize_object()
        addresses = {f: self._engine.get_function_address(f) for f in externals}
        missing = [f for f, address in addresses.items() if not address]
        if missing:
            raise LLVMCodegenError(f"module '{name}': the JIT did not resolve "
                                   f"{', '.join(missing)}")
        compiled = CompiledModule(name, addresses, object_code, source, optimised, self, key=key)
        for f in externals:
            self._defined[f] = name
            self._modules[f] = compiled
            self._symbol_at[addresses[f]] = f
        if key is not None:
            self._by_key[key] = compiled
        return compiled

    # -- helpers ---------------------------------------------------------------------------------
    def _empty_module(self) -> str:
        return str(self.stamp(ir.Module(name="graphc_jit_root")))

    def _parse(self, text: str, name: str = "module") -> llvm.ModuleRef:
        try:
            mod = llvm.parse_assembly(text)
        except RuntimeError as exc:
            raise LLVMCodegenError(f"LLVM module '{name}' does not parse: {exc}") from None
        self._verify(mod, name, "as generated")
        return mod

    @staticmethod
    def _verify(mod: llvm.ModuleRef, name: str, stage: str) -> None:
        try:
            mod.verify()
        except RuntimeError as exc:
            raise LLVMCodegenError(f"LLVM module '{name}' fails verification {stage}: "
                                   f"{exc}") from None

    @staticmethod
    def _external_functions(mod: llvm.ModuleRef) -> list[str]:
        return [f.name for f in mod.functions
                if not f.is_declaration and f.linkage == llvm.Linkage.external]

    def _check_new_symbols(self, module_name: str, names: list[str]) -> None:
        for name in names:
            if name in self._defined:
                raise LLVMCodegenError(
                    f"module '{module_name}' redefines '{name}', already JIT'd by module "
                    f"'{self._defined[name]}'")


# an integer wide enough to be an address, converted to a pointer: code tied to this process
_ABSOLUTE_ADDRESS = re.compile(r"inttoptr \(?i64 (?:[1-9]\d{5,})")

_INIT_LOCK = threading.Lock()
_HOST_LOCK = threading.Lock()
_INITIALISED = False
_HOST: HostTarget | None = None


def _initialise_llvm() -> None:
    global _INITIALISED
    with _INIT_LOCK:
        if not _INITIALISED:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            _INITIALISED = True


def host_target() -> HostTarget:
    """The process-wide host target (created on first use)."""
    global _HOST
    with _HOST_LOCK:
        if _HOST is None:
            _HOST = HostTarget()
        return _HOST


# -- process functions that generated code calls ---------------------------------------------------
# The runtime's waits (backends/llvm/runtime.py barrier, gemm.py worker pool) spin briefly and
# then sleep in the kernel on a futex, so that a waiting thread gives its core to the thread it
# waits for when other processes crowd the cores. Generated code reaches libc through symbols
# registered with LLVM here (an object loaded from the code cache resolves them the same way).
SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine(), 202)
FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 128, 129
_I32, _I64 = ir.IntType(32), ir.IntType(64)
LIBC_FUNCTIONS = {"sched_yield": ir.FunctionType(_I32, []),
                  "syscall": ir.FunctionType(_I64, [_I64], var_arg=True)}


def libc_function(module: ir.Module, name: str) -> ir.Function:
    """libc's ``name`` (a key of ``LIBC_FUNCTIONS``) declared in ``module``."""
    existing = module.globals.get(name)
    return existing or ir.Function(module, LIBC_FUNCTIONS[name], name)


def emit_futex_wait(b: ir.IRBuilder, word, expected) -> None:
    """Sleep while the i32 at ``word`` equals ``expected`` (the kernel checks atomically, so a
    wake between the caller's last check and this call is not lost). May return spuriously:
    callers re-check their condition in a loop."""
    syscall = libc_function(b.module, "syscall")
    null = ir.Constant(ir.IntType(8).as_pointer(), None)
    # every variadic argument a full register: syscall() reads them as longs
    b.call(syscall, [_I64(SYS_FUTEX), word, _I64(FUTEX_WAIT_PRIVATE), b.zext(expected, _I64),
                     null])


def emit_futex_wake_all(b: ir.IRBuilder, word) -> None:
    """Wake every thread sleeping in ``emit_futex_wait`` on ``word``."""
    syscall = libc_function(b.module, "syscall")
    b.call(syscall, [_I64(SYS_FUTEX), word, _I64(FUTEX_WAKE_PRIVATE), _I64(2**31 - 1)])


def _register_libc_functions() -> None:
    libc = ctypes.CDLL(None)
    for name in LIBC_FUNCTIONS:
        llvm.add_symbol(name, ctypes.cast(getattr(libc, name), ctypes.c_void_p).value)


_register_libc_functions()
