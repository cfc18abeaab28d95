"""The 8-3-8 autoencoder: eight one-hot inputs squeezed through three sigmoid hidden units.

    python examples/autoencoder_838.py [--quick] [--out DIR] [--target cpu|reference]

The network has to reproduce its input at its output, and the only way through is a hidden
layer of three units: it must invent a code of 3 values for 8 patterns. Trained long enough,
the hidden values approach 0 or 1 and the network has rediscovered a 3-bit binary code
(Mitchell, Machine Learning, 1997, section 4.6.4) -- nobody told it about binary numbers.

Training: online backpropagation (batch size 1, plain SGD, lr 0.5) on binary cross-entropy,
the natural loss for 0/1 targets on sigmoid outputs. The printed table holds, per one-hot input,
the three hidden values, the code they round to and the output's largest unit; the summary
checks that every input is reproduced and that the eight codes are distinct, and reports how
far the hidden values are from 0/1. How binary the code gets depends on the start: from other
seeds the network often settles on a code in which one unit takes a middle value (about 0.5)
for some inputs -- still eight distinct codes, still a perfect reproduction.

Target "cpu" (the default) compiles the training step once; 40,000 steps of this tiny network
then take well under a second. On the reference interpreter they take about a minute.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from example_support import pyplot, save_figure

from graphc import nn, optim

HERE = os.path.dirname(os.path.abspath(__file__))
ONE_HOT = np.eye(8, dtype=np.float32)
SEED = 2


def train(epochs: int, target: str) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(8, 3), nn.Sigmoid(), nn.Linear(3, 8), nn.Sigmoid(),
                          seed=SEED)
    model.fit(ONE_HOT, ONE_HOT, loss="bce", optimizer=optim.SGD(lr=0.5), epochs=epochs,
              batch_size=1, target=target, progress=False)
    return model


def hidden_values(model: nn.Sequential, target: str) -> np.ndarray:
    """The three hidden sigmoids for every one-hot input: the encoder half of the model
    (its layers are named linear0 and sigmoid1 too, so the trained arrays load by name)."""
    encoder = nn.Sequential(nn.Linear(8, 3), nn.Sigmoid(), input_shape=(8,))
    encoder.load_state_dict(model.state_dict())
    return encoder.predict(ONE_HOT, target=target)


def print_table(hidden: np.ndarray, outputs: np.ndarray) -> None:
    print("input     | hidden values       | code | output argmax (value)")
    for i, (h, o) in enumerate(zip(hidden, outputs)):
        pattern = "".join("1" if j == i else "0" for j in range(8))
        code = "".join(str(int(v)) for v in np.round(h))
        print(f"{pattern}  | {h[0]:.3f} {h[1]:.3f} {h[2]:.3f} | {code}  | "
              f"{int(np.argmax(o))} ({o.max():.3f})")


def save_plot(hidden: np.ndarray, outputs: np.ndarray, path: str) -> str | None:
    plt = pyplot()
    if plt is None:  # matplotlib is an optional extra
        return None
    fig, (ax_h, ax_o) = plt.subplots(1, 2, figsize=(9, 4.2),
                                     gridspec_kw={"width_ratios": [3, 8]})
    for ax, values, title in ((ax_h, hidden, "hidden values"),
                              (ax_o, outputs, "outputs (should be the identity)")):
        ax.imshow(values, cmap="gray_r", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="w" if v > 0.5 else "k")
        ax.set_title(title)
        ax.set_ylabel("one-hot input")
        ax.set_yticks(range(8))
        ax.set_xticks(range(values.shape[1]))
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--epochs", type=int, default=None, help="default 5000 (quick: 1000)")
    parser.add_argument("--out", default=os.path.join(HERE, "output"),
                        help="folder for the PNG (default examples/output)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "reference"))
    args = parser.parse_args(argv)
    epochs = args.epochs or (1000 if args.quick else 5000)

    model = train(epochs, args.target)
    hidden = hidden_values(model, args.target)
    outputs = model.predict(ONE_HOT, target=args.target)
    print(f"8-3-8 autoencoder, sigmoid units, binary cross-entropy, online SGD lr 0.5, "
          f"{epochs} epochs, target {args.target}")
    print_table(hidden, outputs)
    reproduced = bool(np.array_equal(np.argmax(outputs, axis=1), np.arange(8)))
    codes = {tuple(np.round(h).astype(int)) for h in hidden}
    distance = float(np.abs(hidden - np.round(hidden)).max())
    print(f"reproduction: {'every' if reproduced else 'NOT every'} input's largest output is "
          f"its own unit; max |output - input| {np.abs(outputs - ONE_HOT).max():.3f}")
    print(f"codes: {len(codes)} distinct of 8 after rounding; hidden values at most "
          f"{distance:.3f} from 0 or 1")
    os.makedirs(args.out, exist_ok=True)
    png = save_plot(hidden, outputs, os.path.join(args.out, "autoencoder_838.png"))
    print(f"saved {png}" if png else "matplotlib not installed: no picture saved")
    return {"hidden": hidden, "outputs": outputs, "reproduced": reproduced,
            "distinct_codes": len(codes), "max_distance_from_binary": distance, "png": png}


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if summary["reproduced"] and summary["distinct_codes"] == 8 else 1)
