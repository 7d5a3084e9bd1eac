"""DVC versions the data directory: a clone restores it, and it round-trips through a local-folder remote."""
import filecmp
import shutil
import subprocess

import pytest
import yaml

from workflow_helpers import BIN, ROOT, env


def dvc(*args, cwd):
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, env=env())
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_data_dvc_tracks_the_data_directory():
    spec = yaml.safe_load((ROOT / "data.dvc").read_text())
    assert [out["path"] for out in spec["outs"]] == ["data"]
    assert spec["outs"][0]["md5"].endswith(".dir")
    assert "/data" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.fixture()
def clone(tmp_path):
    """A fresh clone of the committed repository: data/ is not in git, only its .dvc pointer."""
    target = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True, capture_output=True)
    assert not (target / "data").exists()
    return target


def test_fresh_clone_pulls_the_data_and_it_matches(clone):
    dvc("pull", "-q", cwd=clone)
    assert filecmp.cmp(clone / "data/world/lexicon.yaml", ROOT / "data/world/lexicon.yaml", shallow=False)
    assert "up to date" in dvc("status", "data.dvc", cwd=clone)


def test_push_to_and_pull_from_a_local_folder_remote(clone, tmp_path):
    dvc("pull", "-q", cwd=clone)
    remote = tmp_path / "remote"
    dvc("remote", "add", "backup", str(remote), cwd=clone)
    dvc("push", "-r", "backup", cwd=clone)
    assert any(p.is_file() for p in remote.rglob("*"))
    shutil.rmtree(clone / "data")
    shutil.rmtree(clone / ".dvc/cache")
    dvc("pull", "-r", "backup", cwd=clone)
    assert filecmp.cmp(clone / "data/world/lexicon.yaml", ROOT / "data/world/lexicon.yaml", shallow=False)


def test_experiments_are_not_saved_to_the_in_repository_remote(clone):
    # The default remote ships data/ inside git; checkpoints and audio must go to a remote outside it.
    from fac.version import save

    (clone / "results/default").mkdir(parents=True)
    (clone / "results/default/metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="inside the repository"):
        save(clone, "default")
    with pytest.raises(ValueError, match="no DVC remote 'elsewhere'"):
        save(clone, "default", remote="elsewhere")


def test_an_experiment_using_anothers_data_is_saved_and_pulled_with_it(tmp_path):
    """DVC does not follow the link results/<exp>/data: `fac version save` saves the experiment whose data it uses
    too, and `fac version pull` (the first half of restore) brings both back in a fresh clone."""
    from fac import version
    from fac.params import claim_data_folder, data_folder

    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (("init", "-q"), ("config", "user.email", "t@example.org"), ("config", "user.name", "t")):
        subprocess.run(["git", *args], cwd=repo, check=True)
    dvc("init", "-q", cwd=repo)
    dvc("remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=repo)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    config = yaml.safe_load((ROOT / "params/default.yaml").read_text())
    results = repo / "results"
    claim_data_folder(str(results), "default", config, *data_folder(str(results), "default", config))
    (results / "default/data/manifests").mkdir()
    (results / "default/data/manifests/asr_train.jsonl").write_text('{"id": 1}\n')
    (results / "default/metrics.json").write_text('{"stage2": {"spoken_qa_acc": 0.5}}\n')
    k1 = {**config, "experiment": "k1", "model": {**config["model"], "speech": {"group_size": 1}}}
    folder, own = data_folder(str(results), "k1", k1)
    assert not own
    claim_data_folder(str(results), "k1", k1, folder, own)
    (results / "k1/metrics.json").write_text('{"stage2": {"spoken_qa_acc": 0.25}}\n')

    assert version.save(repo, "k1") == "results/k1.dvc results/default.dvc"
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "k1"], cwd=repo, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert version.pull(clone, "k1") == ["results/k1.dvc", "results/default.dvc"]
    assert (clone / "results/k1/data.from").read_text() == "default\n"
    assert (clone / "results/default/data/manifests/asr_train.jsonl").read_text() == '{"id": 1}\n'
    # the workflow then finds the data it was built on and links to them again
    assert data_folder(str(clone / "results"), "k1", k1) == (f"{clone}/results/default/data", False)
