"""Reliability as a table: bad input refused with an error that names the file (and line or key) and what was
expected, and faults that lose nothing already produced. README "Reliability" lists every case with the test that
holds it, here or in the module of the component; `test_the_readme_table_names_tests_that_exist` keeps the two in
step. The cases tested here are the ones no component's own module covers: a truncated or missing weights file, a
lexicon with duplicate names, a manifest record without its audio, a params overlay that is not a mapping, a clipped
wav, a full disk (an injected ENOSPC) while a checkpoint, a resume point, a manifest or a metrics file is written,
and a second `snakemake` on an experiment that one is running."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fac.model import FunAudioChatForConditionalGeneration, load_checkpoint
from fac.train.merge import merge_checkpoints
from train_fixtures import one_thread, save_random_drsr, tiny_world  # noqa: F401 (fixtures)
from workflow_helpers import BIN, ROOT, digests, env, rerun_through_faults, snakemake_args


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def readme_cases() -> list[tuple[str, str, str]]:
    """(case, what happens, test) rows of the README's Reliability table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and not set(cells[0]) <= set("-: ") and cells[0] != "case":
            rows.append(tuple(cells))
    return rows


def test_the_readme_table_names_tests_that_exist():
    rows = readme_cases()
    assert len(rows) >= 30
    for case, _, test in rows:
        names = re.findall(r"`([\w/]+\.py)::(\w+)`", test)
        assert names, f"README Reliability row {case!r} names no test"
        for module, name in names:
            path = ROOT / "tests" / module.removeprefix("tests/")
            assert path.is_file(), (case, module)
            assert re.search(rf"^def {name}\(", path.read_text(), re.M), f"{module} has no test {name} ({case})"


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def checkpoint(tiny_world, tmp_path):  # noqa: F811
    out = tmp_path / "ckpt"
    save_random_drsr(tiny_world, out, seed=0)
    return out


def test_a_truncated_weights_file_is_named_with_what_is_wrong(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}: not a readable safetensors file .*truncated"):
        load_checkpoint(checkpoint)
    weights.write_bytes(data[:5])
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}: not a readable safetensors file"):
        load_checkpoint(checkpoint)


def test_a_sharded_checkpoint_missing_a_shard_names_the_index_and_the_shard(tiny_world, tmp_path):  # noqa: F811
    model = save_random_drsr(tiny_world, tmp_path / "one", seed=0)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    tiny_world.tokenizer().save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert load_checkpoint(sharded) is not None  # whole, it loads
    (sharded / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"model.safetensors.index.json: names the shard {re.escape(shards[-1])}, which is not in"):
        load_checkpoint(sharded)


def test_a_lexicon_with_a_duplicate_name_or_value_is_refused_naming_it(lexicon_path, tmp_path):
    from fac.data.world import SourceError, load_source

    source = yaml.safe_load(lexicon_path.read_text())
    for where, change in (("names.first", lambda s: s["names"]["first"].append(s["names"]["first"][0])),
                          ("attributes.city.values", lambda s: s["attributes"]["city"]["values"].append(
                              s["attributes"]["city"]["values"][1]))):
        bad = json.loads(json.dumps(source))
        change(bad)
        path = tmp_path / "lexicon.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(SourceError, match=rf"{re.escape(str(path))}: {re.escape(where)} lists .* twice"):
            load_source(path)


def test_a_manifest_record_without_its_audio_names_file_and_line(tmp_path):
    from fac.data.manifests import read_manifest

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"system": "", "messages": [], "audio": []}) + "\n"
                    + json.dumps({"system": "", "messages": []}) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: record has no 'audio' field"):
        read_manifest(path)


def test_a_clipped_wav_is_taken_as_it_is(tmp_path):
    """Clipping is the recording's, not a format error: the samples come back as they are, not rescaled."""
    import numpy as np
    import soundfile as sf

    from fac.data.audio import read_wav

    t = np.arange(16000) / 16000
    wave = np.clip(3 * np.sin(2 * np.pi * 220 * t), -1, 1)  # most samples at full scale
    sf.write(tmp_path / "clipped.wav", wave, 16000, subtype="PCM_16")
    samples = read_wav(tmp_path / "clipped.wav")
    assert len(samples) == 16000 and np.abs(samples).max() == pytest.approx(1.0, abs=1e-4)
    assert (np.abs(samples) > 0.999).mean() > 0.5
    assert np.allclose(samples, wave, atol=1e-4)


@pytest.mark.parametrize("text", ["- experiment: x\n", "just words\n", "42\n"])
def test_a_params_overlay_that_is_not_a_mapping_is_named(text, tmp_path):
    from fac.params import ParamsError, load

    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(text)
    with pytest.raises(ParamsError, match=rf"{re.escape(str(overlay))}: expected a mapping of parameters"):
        load([ROOT / "params/default.yaml", overlay])


# ------------------------------------------------------------------------------------------------- faults


def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one(tiny_world, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    base, other, out = tmp_path / "base", tmp_path / "other", tmp_path / "merged"
    save_random_drsr(tiny_world, base, seed=0)
    save_random_drsr(tiny_world, other, seed=1)
    merge_checkpoints(base, other, 0.3, out)
    before = load_file(str(out / "model.safetensors"))
    with monkeypatch.context() as m:
        def full(model, folder, *args, **kwargs):  # 100 bytes of the weights, then the disk is full
            (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)
            raise disk_full()

        m.setattr(FunAudioChatForConditionalGeneration, "save_pretrained", full)
        with pytest.raises(OSError, match=rf"{re.escape(str(out))}: writing the new version failed \(No space left"):
            merge_checkpoints(base, other, 0.7, out)
    assert not (tmp_path / "merged.tmp").exists()  # the partial copy is gone
    kept = load_file(str(out / "model.safetensors"))
    assert kept.keys() == before.keys() and all(torch.equal(kept[k], before[k]) for k in before)
    assert json.loads((out / "merge.json").read_text())["alpha"] == 0.3
    load_checkpoint(out)  # still a whole, loadable checkpoint
    merge_checkpoints(base, other, 0.7, out)  # space freed: the rerun writes the new version
    assert json.loads((out / "merge.json").read_text())["alpha"] == 0.7


def test_a_full_disk_while_a_resume_point_is_written_keeps_the_previous_one(monkeypatch, tmp_path):
    from fac.train import trainer as trainer_mod
    from fac.train.trainer import StageConfig, Trainer

    def trainer(state_dir: Path) -> Trainer:
        torch.manual_seed(0)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        return Trainer(torch.nn.Linear(4, 1), StageConfig(steps=6, lr=1e-2, save_every=2, seed=0),
                       lambda m, b: (((m(b["x"]) - b["y"]) ** 2).mean(), {}), lambda step: {"x": x, "y": y},
                       state_dir, "linear")

    uninterrupted = trainer(tmp_path / "reference")
    uninterrupted.train()
    state = tmp_path / "state/last"
    real, saves = trainer_mod.save_file, []

    def full_at_the_second_save(tensors, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # the resume point of step 4 (of 6): the disk fills half-way through it
            Path(path).write_bytes(b"\0" * 100)
            raise disk_full()
        return real(tensors, path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "save_file", full_at_the_second_save)
        with pytest.raises(OSError, match=rf"{re.escape(str(state))}: writing the new version failed \(No space"):
            trainer(tmp_path / "state").train()
    assert not (tmp_path / "state/tmp").exists()  # the partial point is gone, the one of step 2 is whole
    assert json.loads((state / "trainer_state.json").read_text())["step"] == 2
    load_file(str(state / "model.safetensors"))
    again = trainer(tmp_path / "state")
    again.train()  # space freed: resumes from step 2 and ends where the uninterrupted run ended
    assert again.step == 6
    done, reference = again.model.state_dict(), uninterrupted.model.state_dict()
    assert all(torch.equal(done[k], reference[k]) for k in reference)


@pytest.mark.parametrize("writer", ["manifests", "metrics"])
def test_a_full_disk_while_a_manifest_or_metrics_file_is_written_keeps_the_previous_one(writer, tmp_path, monkeypatch):
    from fac.data.manifests import read_manifest, write_manifests
    from fac.data.steps import write_json

    def write(version: int):
        if writer == "manifests":
            records = [{"system": "", "messages": [], "audio": [], "meta": {"version": version}}]
            write_manifests({"a": records, "b": records}, tmp_path, expected=["a", "b"])
        else:
            write_json({"version": version}, tmp_path / "metrics.json")

    def version(name: str) -> int:
        if writer == "manifests":
            return read_manifest(tmp_path / f"{name}.jsonl")[0]["meta"]["version"]
        return json.loads((tmp_path / name).read_text())["version"]

    names = ["a", "b"] if writer == "manifests" else ["metrics.json"]
    target = tmp_path / (f"{names[-1]}.jsonl" if writer == "manifests" else names[-1])
    write(1)
    real = Path.write_text

    def full_on_the_last(path, text, *args, **kwargs):
        if path.name.startswith(f".{target.name}."):  # the temporary that becomes the last file
            real(path, text[:10])
            raise disk_full()
        return real(path, text, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full_on_the_last)
        with pytest.raises(OSError, match=rf"{re.escape(str(target))}: writing the new version failed \(No space"):
            write(2)
    assert version(names[-1]) == 1  # the previous version, whole
    assert not list(tmp_path.glob("*.tmp"))  # the partial temporary is gone
    write(2)
    assert all(version(n) == 2 for n in names)


def test_a_second_snakemake_on_a_running_experiment_is_refused_and_the_first_finishes(tmp_path):
    """Snakemake locks the files a run is producing: a second run that would produce them too stops at once with its
    message, and the first finishes unharmed. (Its tts job speaks through a command that waits for a file this test
    writes once the second run is done, so that the first is still running while the second plans.)"""
    go = tmp_path / "go"
    command = (f"while [ ! -e {go} ]; do sleep 0.1; done; "
               "espeak-ng -v {voice} -s {rate} -p {pitch} -a {amplitude} -w {out} {text}")
    (tmp_path / "slow.yaml").write_text(f"tts:\n  engine: command\n  command: \"{command}\"\n")
    slow = ("tests/configs/micro.yaml", str(tmp_path / "slow.yaml"))
    args = snakemake_args(tmp_path, "--until", "tts", overlays=slow)
    first = subprocess.Popen([str(BIN / "snakemake"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env(), cwd=tmp_path)
    started = tmp_path / "results/micro/data/logs/tts.log"
    deadline = time.monotonic() + 300
    while not started.is_file():
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before its tts job began"
        time.sleep(0.2)
    second = subprocess.run([str(BIN / "snakemake"), *args], capture_output=True, text=True, env=env(), cwd=tmp_path)
    assert first.poll() is None, "the first run ended while the second planned: the check saw no overlap"
    assert second.returncode != 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "Directory cannot be locked" in second.stdout + second.stderr
    go.touch()
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    rows = (tmp_path / "results/micro/data/tts/utterances.jsonl").read_text().splitlines()
    assert rows and all((tmp_path / "results/micro/data" / json.loads(r)["path"]).is_file() for r in rows)


@pytest.fixture(scope="module")
def uninterrupted_data(tmp_path_factory) -> dict[str, str]:
    """The micro world's data half, run once without a fault: its hash manifest (workflow_helpers.digests)."""
    work = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run([str(BIN / "snakemake"), *snakemake_args(work, "data")], capture_output=True, text=True,
                          env=env(), cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return digests(work / "results/micro")


def test_a_killed_snakemake_process_group_is_unlocked_and_rerun_to_the_uninterrupted_outputs(uninterrupted_data,
                                                                                               tmp_path):
    """SIGKILL to the whole `snakemake` process group while its tts job is half-way: the rerun is refused with
    Snakemake's lock message (a killed run cannot release its lock) until `--unlock` with the same arguments; then
    the killed job runs again and the outputs are byte for byte those of a run that was never killed."""
    def run(*extra: str, **kwargs):
        cmd = [str(BIN / "snakemake"), *snakemake_args(tmp_path, "--until", "tts", *extra)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=tmp_path, **kwargs)

    first = subprocess.Popen([str(BIN / "snakemake"), *snakemake_args(tmp_path, "--until", "tts")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=tmp_path,
                             start_new_session=True)
    wavs, deadline = tmp_path / "results/micro/data/tts", time.monotonic() + 300
    while not (wavs.is_dir() and len(list(wavs.rglob("*.wav"))) >= 5):
        assert first.poll() is None and time.monotonic() < deadline, "the run ended before its tts job was half-way"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    total = len([p for p in uninterrupted_data if p.startswith("data/tts/") and p.endswith(".wav")])
    assert len(list(wavs.rglob("*.wav"))) < total  # killed half-way
    refused = run()
    assert refused.returncode != 0 and "--unlock" in refused.stdout + refused.stderr
    assert run("--unlock").returncode == 0
    rerun = run()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ours = digests(tmp_path / "results/micro")  # the world and tts: all the run was asked for
    assert {p for p in uninterrupted_data if p.startswith(("data/world/", "data/tts/"))} <= set(ours)
    assert ours == {p: uninterrupted_data.get(p) for p in ours}


# fac.faults points of the data half ([group:]place[@n]): each kills the job that reaches it first, once.
DATA_POINTS = {
    "tts@4": "the tts job, its fourth clip spoken",
    "asr": "the ASR filter, once its first chunk of clips is judged (in a worker process: the pool breaks)",
    "write.model.safetensors": "the speech tokenizer, its centroids written but not yet renamed into place",
    "group:speech_tokens@3": "the whole snakemake process group, speech tokenisation's third clip tokenised",
    "write.counts.json": "the manifests job, every manifest written, its counts not yet renamed into place",
    "write.detokenizer": "the detokenizer, trained and measured, its folder not yet renamed into place",
}


def test_every_data_rule_killed_mid_work_reruns_to_the_uninterrupted_outputs(uninterrupted_data, tmp_path):
    """Each data rule that takes more than a moment is SIGKILLed in the middle of its work (fac/faults.py), the same
    command is run again until it ends, and the data half is byte for byte that of the run never killed; the tts
    job speaks no clip twice (a finished clip of the killed run is kept)."""
    work = tmp_path / "killed"
    work.mkdir()
    codes = rerun_through_faults(work, "data", points=DATA_POINTS, fired=tmp_path / "fired")
    assert -signal.SIGKILL in codes and 1 in codes  # the group kill ended a run; a job's kill failed one
    assert digests(work / "results/micro") == uninterrupted_data
    tts_log = (work / "results/micro/data/logs/tts.log").read_text()
    kept = re.search(r"tts: (\d+) of \d+ clips kept from an earlier run", tts_log)
    assert kept and int(kept.group(1)) >= 3, tts_log[-2000:]  # the clips spoken before the kill (two threads)


def test_a_fault_point_kills_on_its_nth_pass_once_and_a_malformed_item_is_named(tmp_path, monkeypatch):
    """fac.faults: unset, a point does nothing; `place@2` SIGKILLs the process on its second pass and leaves a marker
    naming the process, and the same command run again passes the point (each fault fires once)."""
    from fac import faults

    monkeypatch.delenv("FAC_FAULTS", raising=False)
    faults.point("tts")  # nothing set: nothing happens
    with pytest.raises(ValueError, match=r"FAC_FAULTS: 'tts@0' is not \[group:\]place\[@n\]"):
        faults.planned("asr,tts@0")
    script = "from fac import faults\nfor n in range(3):\n    faults.point('tts')\n    print(n, flush=True)\n"
    faulty = dict(os.environ, FAC_FAULTS="asr,tts@2", FAC_FAULTS_FIRED=str(tmp_path / "fired"))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=faulty, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL and killed.stdout.split() == ["0"]
    assert os.listdir(tmp_path / "fired") == ["tts@2"]
    pid, *argv = (tmp_path / "fired/tts@2").read_text().split()  # the pid, then the command line (python -c: -c)
    assert pid.isdigit() and argv == ["-c"]
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=faulty, cwd=ROOT)
    assert again.returncode == 0 and again.stdout.split() == ["0", "1", "2"]


def test_a_write_killed_before_its_rename_leaves_no_temporary_after_the_next_write(tmp_path):
    """SIGKILL between the temporary's write and its rename (no handler runs) leaves a hidden `.name.*.tmp`; the
    next write of the same file removes it, so a rerun's folder holds exactly what an uninterrupted run's does."""
    from fac import atomic

    target = tmp_path / "metrics.json"
    script = (f"import os, signal, pathlib; from fac import atomic\n"
              f"def write(p):\n    pathlib.Path(p).write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"atomic.write_file({str(target)!r}, write)\n")
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    assert not target.exists() and len(list(tmp_path.glob(".metrics.json.*.tmp"))) == 1
    other = tmp_path / ".metrics.json.bak.abcd1234.tmp"  # a temporary of another file, metrics.json.bak: kept
    other.write_text("in flight")
    atomic.write_text(target, "whole")
    assert target.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "metrics.json"]
