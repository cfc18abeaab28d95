"""Edge detection as convolution graphs: Sobel, Laplace, Gaussian and the first two steps of Canny.

    python examples/edge_detection.py [--quick] [--out DIR] [--target cpu|reference]

The lecture's classic image filters, each written as a graphc graph of ``Conv`` nodes (plus a few
elementwise ops), compiled by graphc and run on a real photograph (``china.jpg``, shipped with
scikit-learn). Every filtered image is checked against a direct numpy convolution.

* Sobel: Gx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], Gy its transpose, magnitude sqrt(Gx^2 + Gy^2).
* Laplace, 5x5: a discrete second derivative (zero response on constant and linear ramps).
* Gaussian, 5x5, sigma = 1.4, integer weights / 115 as in the lecture (and HIPR's Canny page). Note:
  those integer weights sum to 159, so the /115 kernel also brightens the image by 159/115 = 1.38;
  ``GAUSSIAN_NORMALISED`` divides by 159 instead, and Canny uses that one (smoothing must not scale
  the gradient).
* Canny, steps 1 and 2: smooth with the Gaussian, then the Sobel gradient's magnitude and direction
  (the direction is ``arctan2(Gy, Gx)``, quantised to 0/45/90/135 degrees, computed with numpy since
  the graph has no arctan op). Non-maximum suppression and hysteresis (steps 3-4) are not shown.

A CNN layer computes a cross-correlation; image processing defines convolution with the kernel
flipped. The graphs here flip each kernel so that their outputs are true convolutions, as the
numpy check computes them (zero padding, same size output).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from example_support import pyplot, save_figure

import graphc
from graphc import ops

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
SOBEL_Y = SOBEL_X.T.copy()
LAPLACE_5X5 = np.array([[0, 0, -1, 0, 0],
                        [0, -1, -2, -1, 0],
                        [-1, -2, 16, -2, -1],
                        [0, -1, -2, -1, 0],
                        [0, 0, -1, 0, 0]], np.float32)
GAUSSIAN_WEIGHTS = np.array([[2, 4, 5, 4, 2],
                             [4, 9, 12, 9, 4],
                             [5, 12, 15, 12, 5],
                             [4, 9, 12, 9, 4],
                             [2, 4, 5, 4, 2]], np.float32)
GAUSSIAN_115 = GAUSSIAN_WEIGHTS / 115.0           # the lecture's kernel, as printed
GAUSSIAN_NORMALISED = GAUSSIAN_WEIGHTS / GAUSSIAN_WEIGHTS.sum()

FILTERS = ("sobel_x", "sobel_y", "sobel", "laplace", "gaussian", "canny_magnitude")


def load_photo(quick: bool) -> np.ndarray:
    """china.jpg from scikit-learn as float32 grey levels in [0, 1] ([H, W])."""
    from sklearn.datasets import load_sample_image

    rgb = load_sample_image("china.jpg").astype(np.float32) / 255.0
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luma
    return grey[::4, ::4].copy() if quick else grey


def _conv(x, *kernels: np.ndarray):
    """A same-size, zero-padded true convolution of x ([N, 1, H, W]) with each kernel, one output
    channel each (the kernel is flipped: Conv is a cross-correlation)."""
    weights = np.stack([k[::-1, ::-1] for k in kernels])[:, None].astype(np.float32)
    r = kernels[0].shape[0] // 2
    return ops.conv(x, weights, pads=[r, r, r, r])


def _channel(x, c: int):
    return ops.slice(x, np.array([c]), np.array([c + 1]), np.array([1]))


def _magnitude(gx, gy):
    return ops.sqrt(gx * gx + gy * gy)


def filter_graph(height: int, width: int) -> graphc.Graph:
    """One graph computing every filter of the example from one grey image [1, 1, H, W]."""
    g = graphc.Graph("edge_detection")
    image = g.input("image", (1, 1, height, width))
    sobel = _conv(image, SOBEL_X, SOBEL_Y)                 # [1, 2, H, W]: Gx, Gy
    gx, gy = _channel(sobel, 0), _channel(sobel, 1)
    smooth = _conv(image, GAUSSIAN_NORMALISED)
    canny = _conv(smooth, SOBEL_X, SOBEL_Y)
    cx, cy = _channel(canny, 0), _channel(canny, 1)
    outputs = {"sobel_x": gx, "sobel_y": gy, "sobel": _magnitude(gx, gy),
               "laplace": _conv(image, LAPLACE_5X5), "gaussian": _conv(image, GAUSSIAN_115),
               "canny_magnitude": _magnitude(cx, cy), "canny_gx": cx, "canny_gy": cy}
    for name, value in outputs.items():
        g.output(ops.identity(value, name=name))
    return g


def numpy_convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Direct same-size convolution with zero padding, in float64:
    out[y, x] = sum_ij kernel[i, j] * image[y - i + r, x - j + r]."""
    r = kernel.shape[0] // 2
    padded = np.pad(image.astype(np.float64), r)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape)
    return np.einsum("yxij,ij->yx", windows, kernel[::-1, ::-1].astype(np.float64))


def numpy_filters(image: np.ndarray) -> dict[str, np.ndarray]:
    gx, gy = numpy_convolve(image, SOBEL_X), numpy_convolve(image, SOBEL_Y)
    smooth = numpy_convolve(image, GAUSSIAN_NORMALISED)
    cx, cy = numpy_convolve(smooth, SOBEL_X), numpy_convolve(smooth, SOBEL_Y)
    return {"sobel_x": gx, "sobel_y": gy, "sobel": np.hypot(gx, gy),
            "laplace": numpy_convolve(image, LAPLACE_5X5),
            "gaussian": numpy_convolve(image, GAUSSIAN_115),
            "canny_magnitude": np.hypot(cx, cy), "canny_gx": cx, "canny_gy": cy}


def quantised_direction(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Canny's step 2b: gradient direction rounded to 0, 45, 90 or 135 degrees."""
    degrees = np.degrees(np.arctan2(gy, gx)) % 180.0
    return (np.round(degrees / 45.0) % 4) * 45.0


def run_filters(image: np.ndarray, target: str = "cpu") -> dict[str, np.ndarray]:
    graph = filter_graph(*image.shape)
    model = graphc.compile(graph, target=target)
    results = model.run({"image": image[None, None]})
    return {name: out[0, 0] for name, out in zip(graph.outputs, results)}


def max_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def save_pictures(image, results, direction, path: str) -> str | None:
    plt = pyplot()
    if plt is None:  # matplotlib is an optional extra
        return None
    panels = [("photograph", image, "gray"), ("Sobel Gx", results["sobel_x"], "gray"),
              ("Sobel Gy", results["sobel_y"], "gray"), ("Sobel magnitude", results["sobel"],
                                                         "gray"),
              ("Laplace 5x5", results["laplace"], "gray"), ("Gaussian 5x5 (/115)",
                                                             results["gaussian"], "gray"),
              ("Canny: smoothed gradient", results["canny_magnitude"], "gray"),
              ("Canny: direction (deg)", direction, "twilight")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (title, picture, cmap) in zip(axes.ravel(), panels):
        ax.imshow(picture, cmap=cmap)
        ax.set_title(title)
        ax.axis("off")
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4x smaller image")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "output"),
                        help="folder for the PNG (default examples/output)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "reference"))
    args = parser.parse_args(argv)

    image = load_photo(args.quick)
    results = run_filters(image, args.target)
    reference = numpy_filters(image)
    print(f"image {image.shape[1]}x{image.shape[0]} (china.jpg, grey), target {args.target}")
    print(f"{'filter':<18}{'min':>9}{'max':>9}   max rel. error vs numpy (float64)")
    errors = {}
    for name in FILTERS:
        errors[name] = max_relative_error(results[name], reference[name])
        print(f"{name:<18}{results[name].min():9.3f}{results[name].max():9.3f}   "
              f"{errors[name]:.1e}")
    direction = quantised_direction(results["canny_gx"], results["canny_gy"])
    edges = results["canny_magnitude"] > np.percentile(results["canny_magnitude"], 80)
    shares = {d: float(np.mean(direction[edges] == d)) for d in (0.0, 45.0, 90.0, 135.0)}
    direction = np.where(edges, direction, np.nan)  # shown only on the strongest 20% of edges
    print("Canny directions (strongest 20% of edges): "
          + ", ".join(f"{d:.0f} deg {s:.0%}" for d, s in shares.items()))
    print(f"Gaussian note: the weights sum to {GAUSSIAN_WEIGHTS.sum():.0f}, so /115 scales the "
          f"image by {GAUSSIAN_WEIGHTS.sum() / 115:.2f}")
    os.makedirs(args.out, exist_ok=True)
    png = save_pictures(image, results, direction, os.path.join(args.out, "edge_detection.png"))
    print(f"saved {png}" if png else "matplotlib not installed: no picture saved")
    return {"errors": errors, "png": png, "directions": shares}


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if max(summary["errors"].values()) < 1e-4 else 1)
