"""The demo trains end to end on Shapes in both modes and leaves a complete run folder."""
import pytest
import torch

from afan.checkpoint import load_checkpoint
from afan.config import ConfigError, load_config
from afan.demo import DemoConfig, ShapesCNN, main, train


@pytest.mark.parametrize("mode", ["base", "afan"])
def test_demo_run_writes_config_metrics_plot_and_plain_checkpoints(tmp_path, mode, capsys):
    out = tmp_path / mode
    cfg = load_config(DemoConfig, overrides=[f"mode={mode}", "epochs=2", "train_size=64", "val_size=32",
                                             "batch_size=32", "steps=2", f"out={out}", "device=cpu"])
    summary = train(cfg)
    assert 0.0 <= summary["final_val_acc"] <= 1.0
    assert "SUMMARY mode=" + mode in capsys.readouterr().out
    for name in ("config.yaml", "metrics.csv", "curves.png", "last.pth", "best.pth"):
        assert (out / name).is_file(), name
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3
    if mode == "afan":
        assert "pert_linf" in rows[0]
        linf = float(rows[1].split(",")[rows[0].split(",").index("pert_linf")])
        assert linf == pytest.approx(2 * 0.5 / 255, rel=1e-4)  # steps * gamma / 255
    state = load_checkpoint(out / "last.pth")
    ShapesCNN().load_state_dict(state["model"], strict=True)  # auxiliary BN stripped


def test_demo_refuses_to_overwrite_and_rejects_bad_settings(tmp_path):
    out = tmp_path / "run"
    args = ["epochs=1", "train_size=16", "val_size=16", "batch_size=16", "mode=base", f"out={out}"]
    main(args)
    before = (out / "last.pth").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(args)
    assert (out / "last.pth").read_bytes() == before
    with pytest.raises(ConfigError, match="mask"):
        load_config(DemoConfig, overrides=["n=2", "mask=1"])


def test_split_points_cover_the_network():
    model = ShapesCNN().eval()
    x = torch.rand(2, 3, 32, 32)
    for at in ShapesCNN.split_points:
        torch.testing.assert_close(model.tail(model.head(x, at), at), model(x))
    with pytest.raises(ValueError, match="valid"):
        model.head(x, "block9")
