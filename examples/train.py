"""A small, real DVCLive training: logistic regression on synthetic data with NumPy.

Logs params, per-step train/val loss and accuracy (plots/metrics/*.tsv), a summary (metrics.json) and
an image of the weights every few steps. Run it under livesend:

    livesend run --dry-run -- python examples/train.py --epochs 5
"""

import argparse
import time

import numpy as np
from dvclive import Live


def weights_image(w: np.ndarray) -> np.ndarray:
    """The weight vector as an 8-row grey bar chart (uint8, H x W)."""
    span = np.abs(w).max() or 1.0
    heights = np.clip((np.abs(w) / span * 7).astype(int), 0, 7)
    img = np.zeros((8, len(w) * 4), dtype=np.uint8)
    for i, h in enumerate(heights):
        img[8 - h - 1 :, i * 4 : i * 4 + 3] = 255
    return img


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds of extra 'work' per epoch")
    parser.add_argument("--dir", default="dvclive")
    parser.add_argument("--image-every", type=int, default=5)
    parser.add_argument("--exit-code", type=int, default=0, help="exit with this status after training")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    features = 16
    true_w = rng.normal(size=features)
    x = rng.normal(size=(2000, features))
    y = (x @ true_w + rng.normal(scale=0.5, size=2000) > 0).astype(float)
    x_train, y_train, x_val, y_val = x[:1600], y[:1600], x[1600:], y[1600:]
    w = np.zeros(features)

    def loss_acc(xs, ys):
        p = 1 / (1 + np.exp(-(xs @ w)))
        loss = -np.mean(ys * np.log(p + 1e-9) + (1 - ys) * np.log(1 - p + 1e-9))
        return float(loss), float(np.mean((p > 0.5) == ys))

    with Live(args.dir, save_dvc_exp=False) as live:
        live.log_params({"lr": args.lr, "epochs": args.epochs, "model": {"features": features, "kind": "logreg"}})
        for epoch in range(args.epochs):
            p = 1 / (1 + np.exp(-(x_train @ w)))
            w -= args.lr * x_train.T @ (p - y_train) / len(y_train)
            train_loss, train_acc = loss_acc(x_train, y_train)
            val_loss, val_acc = loss_acc(x_val, y_val)
            live.log_metric("train/loss", train_loss)
            live.log_metric("train/acc", train_acc)
            live.log_metric("val/loss", val_loss)
            live.log_metric("val/acc", val_acc)
            if epoch % args.image_every == 0:
                live.log_image("weights.png", weights_image(w))
            if args.sleep:
                time.sleep(args.sleep)
            live.next_step()
        live.log_metric("best_val_acc", val_acc, plot=False)
    print(f"trained {args.epochs} epochs: val_acc={val_acc:.3f}")
    raise SystemExit(args.exit_code)


if __name__ == "__main__":
    main()
