"""folders.py's tests: which command made a folder, and what each command may delete there. The commands' own
refusals (train, bench, eval --export, prepare) are tested with them in test_emo.py."""

import json

import pytest

import folders


def make(folder, kind, *extra):
    """A folder as `kind`'s command leaves it, plus the named extra files."""
    folder.mkdir(parents=True)
    files = {"run": {"config.json": json.dumps({"run": "abc"}), "metrics.jsonl": "", "latest.pt": "x"},
             "arm": {"bench_arm.json": "{}", "config.json": json.dumps({"run": "abc"}), "train.log": "",
                     "command.json": "[]", "stage1.pt": "x", ".lock": "1"},
             "corpus": {"meta.json": json.dumps({"splits": {}, "domains": []}), "train.bin": "", "val.bin": "",
                        "train_docs.npy": "", "val_docs.npy": ""},
             "export": {"config.json": "{}", "model.safetensors": "x",
                        "emo_export.json": json.dumps({"files": ["config.json", "model.safetensors"]})}}[kind]
    for name, text in {**files, **{name: "mine" for name in extra}}.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("kind", ["run", "arm", "corpus", "export"])
def test_each_kind_of_folder_is_known_by_the_proof_its_command_wrote(tmp_path, kind):
    assert folders.kind_of(make(tmp_path / "f", kind)) == kind
    assert folders.foreign_files(tmp_path / "f", kind) == []
    assert folders.replace_problem(tmp_path / "f", kind) is None


def test_a_folder_without_proof_is_nobodys_and_everything_in_it_is_foreign(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text('{"lr": 3}')  # someone else's config.json names no run
    assert folders.kind_of(tmp_path / "f") is None
    assert folders.foreign_files(tmp_path / "f", "arm") == ["config.json"]
    assert folders.foreign_files(tmp_path / "missing", "arm") == []


@pytest.mark.parametrize("kind,extra", [("arm", "notes.txt"), ("corpus", "README.md"), ("export", "card.md"),
                                        ("arm", "metrics.jsonl.bak")])
def test_anything_beside_what_the_command_wrote_is_named_and_blocks_a_replace(tmp_path, kind, extra):
    make(tmp_path / "f", kind, extra)
    assert folders.foreign_files(tmp_path / "f", kind) == [extra]
    assert folders.replace_problem(tmp_path / "f", kind) == f"holds {extra}, which {folders.MADE_BY[kind]} did not " \
                                                           f"write there"


def test_a_subfolder_is_never_the_commands_own(tmp_path):
    make(tmp_path / "f", "export")
    (tmp_path / "f" / "model.safetensors").unlink()
    (tmp_path / "f" / "model.safetensors").mkdir()  # a name the export wrote, now a folder of someone's
    assert folders.foreign_files(tmp_path / "f", "export") == ["model.safetensors"]


@pytest.mark.parametrize("outer", ["run", "arm", "corpus", "export"])
def test_emo_folders_never_nest_in_either_direction(tmp_path, outer):
    make(tmp_path / "outer", outer)
    assert "lies inside the" in folders.nesting_problem(tmp_path / "outer" / "a" / "b", {"run"})
    assert "holds the" in folders.nesting_problem(tmp_path, {"run"})
    assert folders.nesting_problem(tmp_path / "beside", {"run"}) is None


def test_a_folder_of_another_kind_or_a_file_is_refused_by_name(tmp_path):
    make(tmp_path / "c", "corpus")
    assert folders.nesting_problem(tmp_path / "c", {"run", "arm"}) == \
        "is a corpus folder (data/prepare.py), not bench.py or train.py's"
    (tmp_path / "file").write_text("x")
    assert folders.nesting_problem(tmp_path / "file", {"export"}) == "is a file, not a folder"
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert "is a symbolic link to" in folders.nesting_problem(tmp_path / "link", {"run"})


def test_clear_deletes_only_files_and_then_the_folder(tmp_path):
    make(tmp_path / "f", "arm")
    folders.clear(tmp_path / "f")
    assert not (tmp_path / "f").exists()
    folders.clear(tmp_path / "f")  # a missing folder: nothing to do
    make(tmp_path / "g", "arm")
    (tmp_path / "g" / "sub").mkdir()
    with pytest.raises(OSError):  # a subfolder is never deleted: replace_problem refuses it first
        folders.clear(tmp_path / "g")
    assert (tmp_path / "g" / "sub").is_dir()
