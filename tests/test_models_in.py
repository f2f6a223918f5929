"""Real models in: pretrained torchvision weights from a (faked) local hub cache, their preprocessing, state_dict and
training-script checkpoints, a new head for other classes, and one line for every model input that cannot work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import squeezer
from squeezer.cli import main
from squeezer.heads import replaced_head
from squeezer.models import ModelError, load_model, load_source, preprocessing_of, weights_preprocessing
from squeezer.pretrained import cache_file, weights_entry
from squeezer.search.config import RunConfig, SearchError, check_resume, run_from_json, run_to_json

R18 = "resnet18-f37072fd.pth"  # the file name in ResNet18_Weights.IMAGENET1K_V1's url


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture()
def hub(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME in tmp_path, its hub cache holding an (untrained) resnet18 state_dict under the real file name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), folder / R18)
    return folder


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> str:
    """120 random 3x32x32 images of 10 classes: a .pt data file small enough for resnet18 on a CPU."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(120, 3, 32, 32, generator=generator)
    y = torch.arange(120) % 10
    return str(squeezer.save_data((x, y), tmp_path_factory.mktemp("rgb") / "rgb.pt"))


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"])
def test_a_weights_name_loads_the_hub_cache_file(hub, name) -> None:
    assert cache_file(weights_entry("resnet18", name)) == hub / R18
    model = load_model("resnet18", weights=name)
    saved = torch.load(hub / R18, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_a_missing_hub_file_names_the_file_and_the_folder(capsys, hub, rgb) -> None:
    (hub / R18).unlink()
    code, err = cli(capsys, "space", "--model", "resnet18", "--weights", "IMAGENET1K_V1", "--data", rgb)
    one_line(code, err, R18, str(hub), "TORCH_HOME")


@pytest.mark.parametrize("model, weights, needle", [
    ("resnet18", "IMAGENET1K_V9", "resnet18 has no weights 'IMAGENET1K_V9': choose from IMAGENET1K_V1"),
    ("resnet18", "ResNet50_Weights.IMAGENET1K_V1", "are not weights of resnet18"),
    ("resnet20", "IMAGENET1K_V1", "is not a torchvision model"),
])
def test_a_wrong_weights_name_is_one_line(capsys, hub, rgb, model, weights, needle) -> None:
    code, err = cli(capsys, "space", "--model", model, "--weights", weights, "--data", rgb)
    one_line(code, err, needle)


def test_a_hub_file_that_pickles_objects_is_not_unpickled(capsys, hub, rgb, tmp_path) -> None:
    marker = tmp_path / "ran"

    class CreatesFile:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"fc.weight": CreatesFile()}, hub / R18)
    code, err = cli(capsys, "space", "--model", "resnet18", "--weights", "IMAGENET1K_V1", "--data", rgb)
    one_line(code, err, "not a state_dict", "download.pytorch.org")
    assert not marker.exists()


def test_outputs_that_are_not_the_datas_classes_name_both_numbers_and_both_fixes(capsys, hub, rgb) -> None:
    code, err = cli(capsys, "space", "--model", "resnet18", "--weights", "IMAGENET1K_V1", "--data", rgb)
    one_line(code, err, "1000 outputs", "has 10 classes", "--classes FILE", "squeezer train --replace-head")
    torch.save(torch.load(hub / R18, weights_only=True), hub.parent / "r18.pth")  # the same, as a state_dict file
    code, err = cli(capsys, "space", "--model", "resnet18", "--weights", str(hub.parent / "r18.pth"), "--data", rgb)
    one_line(code, err, "1000 outputs", "has 10 classes")


def test_train_replace_head_fine_tunes_a_new_head_and_its_checkpoint_needs_no_cache(capsys, hub, rgb,
                                                                                     tmp_path) -> None:
    out = tmp_path / "r18.pt"
    code, err = cli(capsys, "train", "--model", "resnet18", "--weights", "IMAGENET1K_V1", "--data", rgb,
                    "--replace-head", "--steps", "2", "--out", str(out))
    assert code == 0, err
    pretrained = torch.load(hub / R18, weights_only=True)
    (hub / R18).unlink()  # a checkpoint rebuilds from its recipe: the hub file is not read again
    record = torch.load(out, weights_only=True)
    assert (record["weights"], record["head"], record["num_classes"]) == ("ResNet18_Weights.IMAGENET1K_V1", "fc", 10)
    model = squeezer.load(out)
    assert model.fc.out_features == 10 and model.fc.weight.shape == (10, 512)
    assert pretrained["fc.weight"].shape == (1000, 512)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), squeezer.load(out)(x))
    assert cli(capsys, "space", "--model", str(out), "--data", rgb)[0] == 0


def test_a_pretrained_builders_own_settings_survive_a_rebuild_without_the_file(tmp_path, monkeypatch) -> None:
    """GoogLeNet's builder, given weights, builds auxiliary classifiers, loads them, drops them and turns on its
    input transform: the checkpoint rebuilds that structure with no hub file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    entry = weights_entry("googlenet", "DEFAULT")
    cache_file(entry).parent.mkdir(parents=True)
    torch.save(torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict(),
               cache_file(entry))
    model, recipe = load_source("googlenet", weights="DEFAULT")
    assert model.transform_input and model.aux1 is None
    squeezer.models.save_checkpoint(model, tmp_path / "g.pt", recipe=recipe)
    cache_file(entry).unlink()
    again = squeezer.load(tmp_path / "g.pt")
    x = torch.rand(1, 3, 64, 64)
    assert again.transform_input and torch.equal(model(x), again(x))


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("squeezenet1_0", "classifier.1")])
def test_the_final_classifier_is_found_by_shape(name, head) -> None:
    model = torchvision.models.get_model(name, num_classes=1000)
    x = torch.rand(2, 3, 64, 64)
    assert replaced_head(model, x, 7) == head
    assert model.eval()(x).shape == (2, 7)


def test_a_training_scripts_arch_checkpoint_loads_without_flags(capsys, tmp_path, rgb) -> None:
    state = squeezer.models.build_model("resnet20", in_channels=1).state_dict()
    wrapped = {"arch": "resnet20", "epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()},
               "best_acc1": torch.tensor(91.0)}
    torch.save(wrapped, tmp_path / "checkpoint.pth.tar")
    assert cli(capsys, "space", "--model", str(tmp_path / "checkpoint.pth.tar"), "--data", "digits")[0] == 0
    torch.save({"arch": "resnet18", "state_dict": torchvision.models.resnet18().state_dict()}, tmp_path / "r18.pt")
    code, err = cli(capsys, "space", "--model", str(tmp_path / "r18.pt"), "--data", rgb)
    one_line(code, err, "1000 outputs", "10 classes")


@pytest.mark.parametrize("kind", ["torchscript", "export"])
@pytest.mark.parametrize("flag", ["--model", "--weights"])
def test_program_files_say_what_they_are_and_what_to_pass(capsys, tmp_path, kind, flag) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    net(torch.rand(1, 1, 8, 8))
    path = tmp_path / ("net.pt" if kind == "torchscript" else "net.pt2")
    if kind == "torchscript":
        with pytest.warns(FutureWarning):
            torch.jit.save(torch.jit.trace(net, torch.rand(1, 1, 8, 8)), path)
    else:
        torch.export.save(torch.export.export(net, (torch.rand(1, 1, 8, 8),)), path)
    args = ["--model", str(path)] if flag == "--model" else ["--model", "resnet20", "--weights", str(path)]
    code, err = cli(capsys, "space", *args)
    what = "TorchScript program (torch.jit.save)" if kind == "torchscript" else "torch.export program"
    one_line(code, err, what, "--model ARCH --weights FILE")


@pytest.mark.parametrize("full", ["ResNet18_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2",
                                  "Inception_V3_Weights.IMAGENET1K_V1", "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1",
                                  "MobileNet_V3_Small_Weights.IMAGENET1K_V1"])
def test_the_weights_preprocessing_is_their_own_transforms(full) -> None:
    entry = torchvision.models.get_weight(full)
    transform = entry.transforms()
    got = preprocessing_of(entry)
    assert [got.resize] == transform.resize_size and [got.size] == transform.crop_size
    assert list(got.mean) == transform.mean and list(got.std) == transform.std
    assert got.interpolation == transform.interpolation.value
    model = full.split("_Weights")[0].lower()
    assert weights_preprocessing(model, full.split(".")[1]) == got


def test_no_preprocessing_is_implied_without_a_weights_name(tmp_path) -> None:
    assert weights_preprocessing("resnet18", None) is None
    assert weights_preprocessing("resnet18", str(tmp_path / "weights.pt")) is None
    assert weights_preprocessing("resnet20", "weights") is None
    with pytest.raises(ModelError, match="has no weights"):
        weights_preprocessing("resnet18", "NOPE")


def test_the_run_records_its_weights_and_a_resume_with_others_is_refused(tmp_path) -> None:
    run = RunConfig(model="resnet18", data="photos", fingerprint="f", weights="ResNet18_Weights.IMAGENET1K_V1")
    there = json.loads(json.dumps(run_to_json(run)))
    assert run_from_json(there).weights == run.weights
    check_resume(there, run_to_json(RunConfig(model="resnet18", data="photos", fingerprint="f")), out=tmp_path)
    with pytest.raises(SearchError, match="weights"):
        check_resume(there, run_to_json(RunConfig(model="resnet18", data="photos", fingerprint="f",
                                                  weights="ResNet18_Weights.IMAGENET1K_V2")), out=tmp_path)


@pytest.fixture(scope="module")
def rgb1000(tmp_path_factory) -> str:
    """Images labelled among 1000 classes, as a folder of ImageNet classes mapped by --classes would be."""
    x = torch.rand(120, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(120) % 10
    y[-1] = 999
    return str(squeezer.save_data((x, y), tmp_path_factory.mktemp("rgb1000") / "rgb1000.pt"))


@pytest.mark.slow  # three short searches of resnet18 and two applies
def test_a_search_records_its_weights_for_resume_and_apply(capsys, hub, rgb1000, tmp_path) -> None:
    out = tmp_path / "run"
    search = ["search", "--model", "resnet18", "--data", rgb1000, "--budget", "macs<=80%", "--workers", "1",
              "--pool", "local", "--latency", "none", "--recovery", "none", "--knobs", "prune", "--out", str(out)]
    assert cli(capsys, *search, "--trials", "1", "--weights", "IMAGENET1K_V1")[0] == 0
    assert json.loads((out / "run.json").read_text())["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert cli(capsys, *search, "--trials", "2")[0] == 0  # resumed without --weights: the record stays
    assert json.loads((out / "run.json").read_text())["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    code, err = cli(capsys, *search, "--trials", "2", "--weights", "IMAGENET1K_V1")
    assert code == 0, err
    (out / "base.pt").unlink()  # apply now rebuilds the run's model from its name and recorded weights
    assert cli(capsys, "apply", str(out), "--trial", "0", "--out", str(tmp_path / "small.pt"))[0] == 0
    (hub / R18).unlink()
    code, err = cli(capsys, "apply", str(out), "--trial", "0", "--out", str(tmp_path / "small.pt"))
    one_line(code, err, R18, str(hub))
