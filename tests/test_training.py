"""The training API: classic learning tasks, the digits benchmarks' accuracy targets, PyTorch
step-for-step agreement, and the mechanics of fit (history, validation, early stopping, partial
batches, schedules, progress bar), evaluate, predict and kfold."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import graphc
from graphc import nn, optim, training
from graphc.errors import FeedError, GraphcError

TARGET = "cpu"
# Tiny models and the fit mechanics run on the interpreter: on a cold code cache every CPU
# specialisation costs seconds of LLVM time, far more than these tests compute.
# test_cpu_fit_matches_reference ties the two targets together step for step.
FAST = "reference"
BOOLEAN_INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)


@pytest.fixture(autouse=True)
def no_progress_bar(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def digits_split():
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    digits = datasets.load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    return model_selection.train_test_split(X, digits.target, test_size=0.2, random_state=0,
                                            stratify=digits.target)


def blobs(n=120, seed=0, classes=3, features=4):
    """Separable Gaussian blobs: an easy classification set."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)) * 4
    labels = rng.integers(0, classes, n)
    X = (centres[labels] + rng.standard_normal((n, features))).astype(np.float32)
    return X, labels


def blob_model(seed=0):
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), seed=seed)


# -- learning -------------------------------------------------------------------------------------
def perceptron(targets, epochs=60):
    """A single linear unit trained online (batch 1) with the delta rule: E = 1/2 (t - o)^2,
    w += lr (t - o) x; classes read off by the nearest target value (threshold 0.5)."""
    model = nn.Sequential(nn.Linear(2, 1), seed=1)
    history = model.fit(BOOLEAN_INPUTS, targets, loss="mse", optimizer=optim.SGD(lr=0.05),
                        epochs=epochs, batch_size=1, target=FAST)
    return model, history


@pytest.mark.parametrize("name,targets", [("AND", [0, 0, 0, 1]), ("OR", [0, 1, 1, 1])])
def test_perceptron_learns_linearly_separable_functions(name, targets):
    model, _ = perceptron(np.array(targets, np.float32))
    assert model.evaluate(BOOLEAN_INPUTS, targets, target=FAST).accuracy == 1.0, name
    predicted = (model.predict(BOOLEAN_INPUTS, target=FAST)[:, 0] > 0.5).astype(int)
    np.testing.assert_array_equal(predicted, targets)


def test_perceptron_cannot_learn_xor():
    targets = np.array([0, 1, 1, 0], np.float32)
    model, history = perceptron(targets, epochs=200)
    # no line separates XOR: whatever the weights, a threshold unit gets one of four wrong
    assert max(history["accuracy"]) < 1.0
    assert model.evaluate(BOOLEAN_INPUTS, targets, target=FAST).accuracy <= 0.75
    # the delta rule converges to the least-squares fit, the constant 0.5
    np.testing.assert_allclose(model.predict(BOOLEAN_INPUTS, target=FAST)[:, 0], 0.5,
                               atol=0.1)


def test_sigmoid_mlp_learns_xor():
    targets = np.array([0, 1, 1, 0], np.float32)
    model = nn.Sequential(nn.Linear(2, 4), nn.Sigmoid(), nn.Linear(4, 1), nn.Sigmoid(), seed=1)
    model.fit(BOOLEAN_INPUTS, targets, loss="mse", epochs=500, batch_size=4, target=FAST,
              optimizer=optim.SGD(lr=2.0, momentum=0.9))
    out = model.predict(BOOLEAN_INPUTS, target=FAST)[:, 0]
    np.testing.assert_array_equal(out > 0.5, targets > 0.5)
    assert np.abs(out - targets).max() < 0.2


def test_autoencoder_8_3_8_reproduces_every_one_hot_code():
    codes = np.eye(8, dtype=np.float32)
    model = nn.Sequential(nn.Linear(8, 3), nn.Sigmoid(), nn.Linear(3, 8), nn.Sigmoid(), seed=0)
    model.fit(codes, codes, loss="bce", optimizer=optim.Adam(lr=0.1), epochs=500,
              batch_size=8, target=FAST)
    out = model.predict(codes, target=FAST)
    np.testing.assert_array_equal(np.argmax(out, axis=1), np.arange(8))


def test_digits_mlp_reaches_96_percent():
    X_train, X_test, y_train, y_test = digits_split()
    model = nn.Sequential(nn.Linear(64, 100), nn.Sigmoid(), nn.Linear(100, 10), seed=0)
    history = model.fit(X_train, y_train, loss="cross_entropy", epochs=30, batch_size=32,
                        optimizer=optim.SGD(lr=0.1, momentum=0.9), target=TARGET)
    assert history["loss"][-1] < history["loss"][0] / 5
    assert model.evaluate(X_test, y_test, target=TARGET).accuracy >= 0.96


def test_digits_cnn_reaches_97_percent():
    X_train, X_test, y_train, y_test = digits_split()
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10), seed=0)
    model.fit(X_train.reshape(-1, 1, 8, 8), y_train, loss="cross_entropy", epochs=10,
              batch_size=64, optimizer=optim.SGD(lr=0.05, momentum=0.9), target=TARGET)
    assert model.evaluate(X_test.reshape(-1, 1, 8, 8), y_test, target=TARGET).accuracy >= 0.97


# -- agreement with PyTorch -----------------------------------------------------------------------
def torch_copy(model, torch):
    """The same network in torch with the same weights (Linear's weight transposed)."""
    layers = []
    for layer in model.layers:
        p = {k: torch.tensor(v.T.copy() if isinstance(layer, nn.Linear) and k == "weight" else v)
             for k, v in layer.params.items()}
        if isinstance(layer, nn.Linear):
            t = torch.nn.Linear(layer.in_features, layer.out_features)
        elif isinstance(layer, nn.Conv2d):
            t = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                layer.stride, layer.padding)
        elif isinstance(layer, nn.BatchNorm2d):
            t = torch.nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum)
        else:
            t = {"Sigmoid": torch.nn.Sigmoid(), "ReLU": torch.nn.ReLU(),
                 "Flatten": torch.nn.Flatten(), "Tanh": torch.nn.Tanh()}[layer.kind]
        with torch.no_grad():
            for key, value in p.items():
                getattr(t, key).copy_(value)
        layers.append(t)
    return torch.nn.Sequential(*layers)


def torch_steps(net, X, y, batch_size, opt, loss_fn, torch):
    losses = []
    for start in range(0, len(X), batch_size):
        opt.zero_grad()
        loss = loss_fn(net(torch.tensor(X[start:start + batch_size])),
                       torch.tensor(y[start:start + batch_size]))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("case", ["mlp-momentum", "cnn-batchnorm"])
def test_twenty_sgd_steps_match_pytorch(case):
    """Identical initial weights and batches: the mean loss over 20 steps, the loss after them
    and the weights agree with PyTorch to 1e-4 relative."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    X_train, _, y_train, _ = digits_split()
    batch = 16
    X, y = X_train[:20 * batch], y_train[:20 * batch]
    if case == "mlp-momentum":
        model = nn.Sequential(nn.Linear(64, 100), nn.Sigmoid(), nn.Linear(100, 10), seed=3)
        cfg = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    else:
        X = X.reshape(-1, 1, 8, 8)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Flatten(), nn.Linear(256, 10), seed=3)
        cfg = {"lr": 0.05}
    model.initialise(X.shape[1:])
    net = torch_copy(model, torch)
    history = model.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(**cfg), epochs=1,
                        batch_size=batch, shuffle=False, target=TARGET)
    step_losses = torch_steps(net, X, y, batch, torch.optim.SGD(net.parameters(), **cfg),
                              torch.nn.CrossEntropyLoss(), torch)
    np.testing.assert_allclose(history["loss"][0], np.mean(step_losses), rtol=1e-4)
    net.eval()
    with torch.no_grad():
        after = torch.nn.CrossEntropyLoss()(net(torch.tensor(X)), torch.tensor(y)).item()
    np.testing.assert_allclose(model.evaluate(X, y, target=TARGET).loss, after, rtol=1e-4)
    torch_state = {k: v.numpy() for k, v in net.state_dict().items()}
    for i, layer in enumerate(model.layers):
        for key, value in {**layer.params, **layer.buffers}.items():
            want = torch_state[f"{i}.{key}"]
            want = want.T if isinstance(layer, nn.Linear) and key == "weight" else want
            np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-5)


# -- mechanics ----------------------------------------------------------------------------------
def test_history_validation_split_and_accuracy():
    X, y = blobs()
    model = blob_model()
    history = model.fit(X, y, loss="cross_entropy", optimizer=optim.Adam(lr=0.05), epochs=8,
                        batch_size=16, validation_split=0.25, target=FAST)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 8 for v in history.history.values()) and history.epochs_run == 8
    assert history["loss"][-1] < history["loss"][0]
    # the held-out quarter is the last 30 samples: the recorded metrics are evaluate's
    final = model.evaluate(X[90:], y[90:], target=FAST)
    assert history["val_loss"][-1] == pytest.approx(final.loss, rel=1e-5)
    assert history["val_accuracy"][-1] == final.accuracy
    assert final.accuracy > 0.9


def test_early_stopping_stops_and_restores_the_best_weights():
    X, y = blobs(n=80, seed=1)
    Xv, yv = blobs(n=40, seed=1)  # same centres, other noise
    model = blob_model()
    history = model.fit(X, y, loss="cross_entropy", epochs=200, batch_size=8,
                        optimizer=optim.SGD(lr=3.0), validation_data=(Xv, yv),
                        early_stopping=3, target=FAST)  # lr far too high: val loss wobbles
    assert history.stopped_early and history.epochs_run < 200
    assert history.epochs_run == history.best_epoch + 1 + 3
    best = min(history["val_loss"])
    assert history["val_loss"][history.best_epoch] == best
    assert model.evaluate(Xv, yv, target=FAST).loss == pytest.approx(best, rel=1e-5)


def test_partial_last_batch_and_drop_last():
    X, y = blobs(n=50)
    a, b = blob_model(), blob_model()
    a.fit(X, y, loss="cross_entropy", epochs=2, batch_size=16, target=FAST, shuffle=False)
    b.fit(X, y, loss="cross_entropy", epochs=2, batch_size=16, target=FAST, shuffle=False,
          drop_last=True)
    # 50 = 3 * 16 + 2: the 2-sample batch is one more step in a, none in b
    ref = blob_model()
    ref.fit(X[:48], y[:48], loss="cross_entropy", epochs=2, batch_size=16, target="reference",
            shuffle=False)
    for name, value in b.parameters().items():
        np.testing.assert_allclose(value, ref.parameters()[name], rtol=1e-5, atol=1e-6)
        assert not np.allclose(value, a.parameters()[name])


def test_cpu_fit_matches_reference_with_dropout_and_shuffling():
    """The same seeded fit (shuffle order and Dropout masks from the seed) on target cpu and on
    the interpreter; also checks the bound fast path against checked runs."""
    X, y = blobs(n=45)

    def make():
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3),
                             seed=2)

    results = {}
    for target, bind in (("reference", False), ("cpu", True), ("cpu", False)):
        model = make()
        training.BIND_STEPS = bind
        try:
            history = model.fit(X, y, loss="cross_entropy", epochs=3, batch_size=8, seed=5,
                                optimizer=optim.SGD(lr=0.1, momentum=0.5), target=target)
        finally:
            training.BIND_STEPS = True
        results[target, bind] = (history["loss"], model.parameters())
    base_losses, base_params = results["reference", False]
    for key in (("cpu", True), ("cpu", False)):
        losses, params = results[key]
        np.testing.assert_allclose(losses, base_losses, rtol=1e-4)
        for name, value in params.items():
            np.testing.assert_allclose(value, base_params[name], rtol=1e-4, atol=1e-5)
    # the masks differ per step: with Dropout the training loss is not the evaluation loss
    assert base_losses[-1] != pytest.approx(make().evaluate(X, y, loss="cross_entropy",
                                                            target="reference").loss)


def test_seeded_fits_are_reproducible_and_seeds_matter():
    X, y = blobs(n=40)
    runs = []
    for seed in (0, 0, 1):
        model = blob_model()
        model.fit(X, y, loss="cross_entropy", epochs=2, batch_size=8, seed=seed, target=FAST)
        runs.append(model.parameters()["linear0.weight"])
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_learning_rate_schedule_does_not_recompile(monkeypatch):
    X, y = blobs(n=32)
    model = blob_model()
    model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=8, target=FAST)
    compiled = []
    original = training.Program.__init__

    def counting(self, *args, **kwargs):
        compiled.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(training.Program, "__init__", counting)
    opt = optim.SGD(lr=0.1)
    lrs = []
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=4, batch_size=8, target=FAST,
              lr_schedule=lambda epoch: lrs.append(0.1 / (epoch + 1)) or lrs[-1])
    assert compiled == [] and opt.lr == pytest.approx(0.025)
    frozen = blob_model()
    frozen.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(lr=0.0), epochs=1, batch_size=8,
               target=FAST)
    assert compiled == []  # another model of the same architecture shares the program
    for name, value in blob_model().parameters().items():
        np.testing.assert_array_equal(frozen.parameters()[name], value)  # lr 0: no change


def test_kfold_returns_k_scores():
    X, y = blobs(n=60)
    result = graphc.kfold(blob_model, X, y, k=4, loss="cross_entropy", epochs=5, batch_size=8,
                          optimizer=optim.Adam(lr=0.05), target=FAST)
    assert len(result) == 4 and len(result.losses) == 4 and len(result.histories) == 4
    assert all(0.0 <= s <= 1.0 for s in result.scores) and result.mean > 0.8
    with pytest.raises(GraphcError, match="k"):
        graphc.kfold(blob_model, X, y, k=1, loss="cross_entropy")


def test_progress_bar_honours_tqdm_disable_and_absence(monkeypatch, capsys):
    tqdm = pytest.importorskip("tqdm")
    assert tqdm
    X, y = blobs(n=16)
    model = blob_model()
    monkeypatch.delenv("TQDM_DISABLE")
    model.fit(X, y, loss="cross_entropy", epochs=2, batch_size=8, target=FAST)
    assert "2/2" in capsys.readouterr().err
    model.fit(X, y, epochs=2, batch_size=8, target=FAST, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    model.fit(X, y, epochs=2, batch_size=8, target=FAST)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # not installed: no bar, no error
    model.fit(X, y, epochs=2, batch_size=8, target=FAST)
    assert capsys.readouterr().err == ""


def test_bce_and_mse_accuracy_conventions():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 2)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.float32)
    logistic = nn.Sequential(nn.Linear(2, 1), nn.Sigmoid(), seed=0)
    logistic.fit(X, y, loss="bce", optimizer=optim.SGD(lr=1.0), epochs=30, batch_size=16,
                 target=FAST)
    assert logistic.evaluate(X, y, target=FAST).accuracy > 0.95
    signs = 2 * y - 1  # -1 / +1 targets: the nearest class value decides
    linear = nn.Sequential(nn.Linear(2, 1), seed=0)
    linear.fit(X, signs, loss="mse", optimizer=optim.SGD(lr=0.05), epochs=30, batch_size=16,
               target=FAST)
    assert linear.evaluate(X, signs, target=FAST).accuracy > 0.95
    regression = rng.standard_normal(64).astype(np.float32)  # 64 distinct values: no classes
    history = nn.Sequential(nn.Linear(2, 1), seed=0).fit(X, regression, loss="mse", epochs=1,
                                                         batch_size=16, target=FAST)
    assert np.isnan(history["accuracy"][0])


def test_fit_errors_name_what_is_wrong():
    X, y = blobs(n=20)
    model = blob_model()
    with pytest.raises(GraphcError, match="loss="):
        model.fit(X, y)
    with pytest.raises(GraphcError, match="unknown loss"):
        model.fit(X, y, loss="hinge")
    with pytest.raises(FeedError, match="20 samples but y has 19"):
        model.fit(X, y[:-1], loss="cross_entropy")
    with pytest.raises(FeedError, match="label 3"):
        model.fit(X, np.full(20, 3), loss="cross_entropy")
    with pytest.raises(FeedError, match="label 1.5"):
        model.fit(X, np.full(20, 1.5), loss="cross_entropy")
    with pytest.raises(GraphcError, match="not both"):
        model.fit(X, y, loss="cross_entropy", validation_split=0.2, validation_data=(X, y))
    with pytest.raises(GraphcError, match="validation_split"):
        model.fit(X, y, loss="cross_entropy", validation_split=1.5)
    with pytest.raises(GraphcError, match="batch_size"):
        model.fit(X, y, loss="cross_entropy", batch_size=0)
    with pytest.raises(FeedError, match="bce"):
        model.fit(X, np.full((20, 3), 2.0), loss="bce")
