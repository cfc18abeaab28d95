"""The host JIT target: llvmlite initialisation, target machine, O3 pipeline and code library.

One ``HostTarget`` per process (``host_target()``) owns

* the llvmlite binding initialisation (native target + asm printer, done once; since llvmlite
  0.45 ``llvm.initialize()`` raises, so it is never called);
* the host ``TargetMachine``: the CPU name and feature string LLVM reports for this machine
  (e.g. ``znver5`` with ``+avx512f,...``), opt level 3, JIT code model;
* the new-pass-manager ``default<O3>`` module pipeline built from that machine;
* one MCJIT ``ExecutionEngine`` that every compiled module is added to.

``HostTarget.compile(module)`` is the code-library API: it stamps the module with the host triple
and data layout, parses and verifies it, optimises it, JITs it and returns a ``CompiledModule``
from which function addresses (or ctypes callables), the optimised LLVM IR text and the
assembly text can be read.

Invariants: compiled code is never freed while the process lives (the engine owns every
module, and callers keep raw function addresses); an external symbol name is defined by at most
one compiled module (a second definition raises ``LLVMCodegenError``); compilation is
serialised by a lock so that threads may compile concurrently.
"""

from __future__ import annotations

import ctypes
import threading
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
    """One module after verification, O3 and JIT: symbols, optimised IR and assembly."""

    name: str
    source_ir: str                 # the IR as generated, before optimisation
    optimised_ir: str              # the IR after the O3 pipeline (what was JIT'd)
    addresses: dict[str, int]      # external function name -> address in this process
    _target: HostTarget = field(repr=False)
    _assembly: str | None = field(default=None, repr=False)

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

    def compile(self, module: ir.Module) -> CompiledModule:
        """Verify, optimise and JIT ``module``; the code lives as long as the process."""
        self.stamp(module)
        source = str(module)
        with self._lock:
            mod = self._parse(source, module.name)
            externals = self._external_functions(mod)
            self._check_new_symbols(module.name, externals)
            self.optimise(mod)
            self._verify(mod, module.name, "after optimisation")
            optimised = str(mod)
            self._engine.add_module(mod)
            self._engine.finalize_object()
            addresses = {name: self._engine.get_function_address(name) for name in externals}
            for name in externals:
                self._defined[name] = module.name
        return CompiledModule(module.name, source, optimised, addresses, self)

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
