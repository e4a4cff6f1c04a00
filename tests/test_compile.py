"""torch.compile of the models' stages: the same training as without it, the same checkpoint
keys, and a plain fallback where inductor cannot run."""
import pytest
import torch

from afan_harness.config import load_config
from afan_harness.runtime import compile_parts
from Classification import train as cls_train
from Classification.config import TrainConfig as ClsConfig
from Detection import train as det_train
from Segmentation import train as seg_train
from Segmentation.config import TrainConfig as SegConfig

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    yield
    torch._dynamo.reset()  # compiled code of one test must not serve the next


def _afan_steps(compile_backend):
    """Two A-FAN updates of a ResNet-20 from the same seed, its stages compiled or not."""
    cfg = load_config(ClsConfig, overrides=["model=resnet20", "mode=afan", "afan.steps=2", "afan.n=2", "afan.mask=01",
                                            f"compile={compile_backend}"])
    torch.manual_seed(0)
    model = cls_train.build_model(cfg, 4, CPU).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8) % 4
    for _ in range(2):
        optimizer.zero_grad()
        cls_train.training_step(model, x, y, cfg).loss.backward()
        optimizer.step()
    return model


def test_compiled_stages_train_like_eager_ones_and_keep_the_checkpoint_keys():
    eager, compiled = _afan_steps("off"), _afan_steps("eager")
    assert compiled.layer1._compiled_call_impl is not None and eager.layer1._compiled_call_impl is None
    reference = eager.state_dict()
    assert compiled.state_dict().keys() == reference.keys()
    for key, value in compiled.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("task", ["segmentation", "fasterrcnn_resnet18_c4", "fasterrcnn_resnet18_fpn"])
def test_every_task_names_its_stages_to_compile(task):
    if task == "segmentation":
        model = seg_train.build_model(load_config(SegConfig, overrides=["model.name=deeplabv3plus_mobilenet"]), 3, CPU)
    else:
        cfg = load_config(det_train.TrainConfig, overrides=[f"model.name={task}"])
        model = det_train.build_model(cfg, 3, CPU)
    parts = model.parts_to_compile()
    assert parts and all(isinstance(p, torch.nn.Module) for p in parts)
    # Together the parts hold nearly every parameter: the work worth compiling.
    covered = sum(p.numel() for part in parts for p in part.parameters())
    assert covered >= 0.99 * sum(p.numel() for p in model.parameters())


def test_inductor_without_a_compiler_falls_back_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    part = torch.nn.Linear(2, 2)
    assert compile_parts([part], "inductor", CPU) == "off"
    assert "compile=inductor needs a C++ compiler" in capsys.readouterr().out
    assert part._compiled_call_impl is None
    with pytest.raises(ValueError, match="compile='fast' is not valid; choose one of off, inductor, eager"):
        compile_parts([part], "fast", CPU)
