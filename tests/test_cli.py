"""``python -m neox_rt.generate``: the three modes, records, resume, configs, and every bad input.

Most runs call ``main(argv)`` in-process (fast); a few run the real command in a subprocess for exit
codes, stdin pipes and the absence of tracebacks.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import neox_rt
from neox_rt import default_model
from neox_rt import generate as cli
from neox_rt.engine.sampling import SamplingParams
from neox_rt.generate import DEFAULT_MODEL_SAMPLING, GPT_NEOX_GENERATION_DEFAULTS, main, parse_settings
from tests.conftest import REPO, make_hf_model, save_hf

FIELDS = {"context": str, "text": str, "length": int, "finished": bool, "duration_seconds": float}
PROMPTS = ["Hello world", "def fibonacci(n):", "The quick brown fox", "Hello", "jumps over the lazy dog"]


def copy_checkpoint_without(src, dst, missing: str):
    """A copy of the checkpoint folder `src` at `dst` without the file `missing`."""
    dst.mkdir()
    for name in os.listdir(src):
        if name != missing:
            shutil.copy(os.path.join(src, name), dst / name)
    return dst

def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of an in-process run."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records_of(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_record(r, return_logits=False):
    for key, kind in FIELDS.items():
        assert isinstance(r[key], kind), (key, r)
    assert r["message"] is None or isinstance(r["message"], str)
    assert r["length"] >= 0 and r["duration_seconds"] >= 0
    assert ("logprobs" in r) == return_logits


def check_error(code, err, *needles):
    """Exit status 2, and one error line (the last line of stderr; progress lines may precede it)."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("neox_rt: error: "), err
    for n in needles:
        assert n in errors[0], (n, errors[0])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def api(tiny_checkpoint):
    return neox_rt.load(tiny_checkpoint, device="cpu", progress=False)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    # blank lines and surrounding spaces are dropped, as in gpt-neox
    path.write_text("\n".join(["  " + PROMPTS[0], "", PROMPTS[1], "   ", *PROMPTS[2:]]) + "\n\n")
    return str(path)


# -- modes on the embedded default -----------------------------------------------------------------------
def test_unconditional_on_embedded_default(capsys):
    code, out, err = run_cli(capsys, "--num-samples", 3, "--maximum-tokens", 6, "--temperature", 1.0,
                             "--seed", 3)
    assert code == 0, err
    recs = records_of(out)
    assert len(recs) == 3
    for r in recs:
        check_record(r)
        assert r["context"] == "" and r["length"] <= 6
        assert r["finished"] == (r["length"] < 6)
    if default_model.default_model_path() is None:
        assert "random weights" in err
    assert "done: 3 prompts" in err.strip().splitlines()[-1] and "tokens/s" in err


def test_random_stand_in_is_deterministic(capsys):
    """The stand-in that runs while no trained default model is installed."""
    a = default_model.load_random(device="cpu")
    assert "random weights" in capsys.readouterr().err
    b = default_model.load_random(device="cpu", notice=False)
    assert a.tokenizer.eos_id == 0 and a.tokenizer.vocab_size <= a.config.vocab_size
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    ra = a.generate("Hello", max_new_tokens=8)
    assert ra.token_ids == b.generate("Hello", max_new_tokens=8).token_ids and len(ra.token_ids) > 0


def test_default_model_path(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIR", str(tmp_path))
    assert default_model.default_model_path() is None  # no config.json: the stand-in runs
    (tmp_path / "config.json").write_text("{}")
    assert default_model.default_model_path() == str(tmp_path)


def test_prompt_flag_on_embedded_default(capsys):
    code, out, err = run_cli(capsys, "--prompt", "The quick brown fox", "--maximum-tokens", 5)
    assert code == 0, err
    (r,) = records_of(out)
    check_record(r)
    assert r["context"] == "The quick brown fox"


# -- the defaults: the embedded default model, a config, --model ----------------------------------------------
SAMPLING_KEYS = ("num_samples", "maximum_tokens", "temperature", "top_k", "top_p", "seed")


def sampling_of(s):
    return {k: getattr(s, k) for k in SAMPLING_KEYS}


def test_default_run_samples_reproducibly(capsys):
    """`python -m neox_rt.generate` alone: several sampled texts, the same again, others with another seed."""
    code, out, err = run_cli(capsys)
    assert code == 0, err
    recs = records_of(out)
    assert len(recs) == DEFAULT_MODEL_SAMPLING["num_samples"] >= 2
    for r in recs:
        check_record(r)
        assert r["context"] == "" and 0 < r["length"] <= DEFAULT_MODEL_SAMPLING["maximum_tokens"]
    texts = [r["text"] for r in recs]
    assert len(set(texts)) > 1  # sampled, not greedy
    assert [r["text"] for r in records_of(run_cli(capsys)[1])] == texts  # the fixed default seed
    assert [r["text"] for r in records_of(run_cli(capsys, "--seed", DEFAULT_MODEL_SAMPLING["seed"])[1])] == texts
    other = [r["text"] for r in records_of(run_cli(capsys, "--seed", 99)[1])]
    assert len(other) == len(texts) and other != texts


def test_default_run_settings_and_configs_default_yml():
    """No config, no --model: DEFAULT_MODEL_SAMPLING, which configs/default.yml repeats key for key."""
    s = parse_settings([])
    assert sampling_of(s) == DEFAULT_MODEL_SAMPLING
    assert not SamplingParams(s.temperature, s.top_k, s.top_p).greedy
    from_yml = parse_settings([os.path.join(REPO, "configs", "default.yml")])
    assert sampling_of(from_yml) == DEFAULT_MODEL_SAMPLING and from_yml.load is None
    # the other modes on the default model sample the same way
    assert sampling_of(parse_settings(["--prompt", "def f():"]))["temperature"] == DEFAULT_MODEL_SAMPLING["temperature"]


def test_config_given_uses_gpt_neox_defaults(tmp_path):
    """A config that sets no generation key: gpt-neox's text_generation.yml values (102 tokens, temperature
    1.0, no top-k or top-p), with or without a load key; what the config sets stays."""
    for text in ("load: some/checkpoint\n", "seq-length: 2048\n"):
        cfg = tmp_path / "c.yml"
        cfg.write_text(text)
        s = parse_settings([str(cfg)])
        assert {k: getattr(s, k) for k in GPT_NEOX_GENERATION_DEFAULTS} == GPT_NEOX_GENERATION_DEFAULTS
        assert GPT_NEOX_GENERATION_DEFAULTS == dict(maximum_tokens=102, temperature=1.0, top_k=0, top_p=0.0)
        assert not SamplingParams(s.temperature, s.top_k, s.top_p).greedy  # plain sampling at temperature 1
        assert s.num_samples == 1 and s.seed is None
    cfg = tmp_path / "greedy.yml"
    cfg.write_text("temperature: 0\ntop_k: 0\ntop-p: 0\nmaximum_tokens: 20\n")
    s = parse_settings([str(cfg)])
    assert (s.temperature, s.top_k, s.top_p, s.maximum_tokens) == (0.0, 0, 0.0, 20)
    assert SamplingParams(s.temperature, s.top_k, s.top_p).greedy  # gpt-neox: all three 0 is greedy
    cfg.write_text("top_p: 0.5\n")
    s = parse_settings([str(cfg)])
    assert (s.temperature, s.top_p, s.maximum_tokens) == (1.0, 0.5, 102)


def test_model_without_config_stays_greedy():
    s = parse_settings(["--model", "some/checkpoint"])
    assert sampling_of(s) == dict(num_samples=1, maximum_tokens=64, temperature=0.0, top_k=0, top_p=0.0, seed=None)


def test_flags_override_every_default(tmp_path):
    flags = ["--num-samples", "2", "--maximum-tokens", "7", "--temperature", "0.3", "--top-k", "5", "--top-p",
             "0.5", "--seed", "11"]
    want = dict(num_samples=2, maximum_tokens=7, temperature=0.3, top_k=5, top_p=0.5, seed=11)
    cfg = tmp_path / "c.yml"
    cfg.write_text("temperature: 0.9\nmaximum_tokens: 40\nnum-samples: 4\nseed: 3\n")
    for head in ([], ["--model", "some/checkpoint"], [str(cfg)], [os.path.join(REPO, "configs", "default.yml")]):
        assert sampling_of(parse_settings(head + flags)) == want, head
    s = parse_settings(["--temperature", "0"])  # greedy on the default model: only the flag changed
    assert s.temperature == 0.0 and s.maximum_tokens == DEFAULT_MODEL_SAMPLING["maximum_tokens"]


def test_greedy_flag_on_the_default_model(capsys):
    code, out, err = run_cli(capsys, "--temperature", 0, "--num-samples", 2, "--maximum-tokens", 8)
    assert code == 0, err
    a, b = records_of(out)
    assert a["text"] == b["text"] and a["length"] <= 8


def test_terminal_gets_readable_text_files_and_pipes_json(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_stdout_is_terminal", lambda: True)
    code, out, err = run_cli(capsys, "--maximum-tokens", 12)
    assert code == 0, err
    monkeypatch.setattr(cli, "_stdout_is_terminal", lambda: False)
    recs = records_of(run_cli(capsys, "--maximum-tokens", 12)[1])
    n = DEFAULT_MODEL_SAMPLING["num_samples"]
    assert len(recs) == n
    expected = "".join(cli.readable_record(r, i + 1) for i, r in enumerate(recs))
    assert out == expected and "{" not in out.splitlines()[0]
    for i, r in enumerate(recs):
        assert f"--- sample {i + 1}: {r['length']} tokens, " in out and r["text"] in out
    # with an output file the records go there as JSON lines, terminal or not
    monkeypatch.setattr(cli, "_stdout_is_terminal", lambda: True)
    path = tmp_path / "out.jsonl"
    code, out, err = run_cli(capsys, "--maximum-tokens", 12, "-o", path)
    assert code == 0 and out == ""
    assert [r["text"] for r in records_of(path.read_text())] == [r["text"] for r in recs]


def test_readable_record_of_a_prompt_and_a_skipped_one():
    r = {"context": "def f(", "text": "x):", "length": 2, "finished": False, "message": None}
    assert cli.readable_record(r, 4) == "--- prompt 4: 2 tokens, cut at maximum_tokens ---\ndef f(x):\n\n"
    r = {"context": "long", "text": None, "length": 0, "finished": False, "message": "too long; prompt skipped"}
    assert cli.readable_record(r, 1) == "--- prompt 1: skipped ---\nlong\n(too long; prompt skipped)\n\n"


def test_default_run_piped_is_json_lines():
    proc = subprocess.run([sys.executable, "-m", "neox_rt.generate", "--maximum-tokens", "8"], capture_output=True,
                          text=True, cwd=REPO, timeout=300, stdin=subprocess.DEVNULL, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    recs = records_of(proc.stdout)
    assert len(recs) == DEFAULT_MODEL_SAMPLING["num_samples"]
    for r in recs:
        check_record(r)


# -- input-file mode on an HF checkpoint -------------------------------------------------------------------
def test_input_file_matches_python_api(capsys, tmp_path, tiny_checkpoint, api, prompts_file):
    out_path = tmp_path / "samples.jsonl"
    code, out, err = run_cli(capsys, "--model", tiny_checkpoint, "-i", prompts_file, "-o", out_path,
                             "--maximum-tokens", 12, "--batch-size", 2, "--return-logits")
    assert code == 0, err
    assert out == ""  # records went to the file
    recs = records_of(out_path.read_text())
    assert [r["context"] for r in recs] == PROMPTS  # input order kept across batches of 2
    expected = []
    for i in range(0, len(PROMPTS), 2):  # the same batches through the Python API
        expected += api.generate(PROMPTS[i:i + 2], max_new_tokens=12, return_logprobs=True)
    for r, e in zip(recs, expected):
        check_record(r, return_logits=True)
        assert r["text"] == e.text and r["length"] == len(e.token_ids) and r["finished"] == e.finished
        assert len(r["logprobs"]) == r["length"] and all(lp <= 0 for lp in r["logprobs"])
        assert r["finished"] == (r["length"] < 12)
    summary = err.strip().splitlines()[-1]
    assert f"done: {len(PROMPTS)} prompts, {sum(r['length'] for r in recs)} generated tokens" in summary


def test_unconditional_on_checkpoint_matches_api(capsys, tiny_checkpoint, api):
    code, out, err = run_cli(capsys, "--model", tiny_checkpoint, "--num-samples", 2, "--maximum-tokens", 9)
    assert code == 0, err
    recs = records_of(out)
    e = api.generate([[api.tokenizer.eos_id]], max_new_tokens=9)[0]  # greedy from <|endoftext|>
    assert [r["text"] for r in recs] == [e.text, e.text] and recs[0]["length"] == len(e.token_ids)


def test_finished_on_stop_string(capsys, tiny_checkpoint, api):
    greedy = api.generate("Hello world", max_new_tokens=20)
    assert len(greedy.text) > 4, "the fixture model should produce some text"
    stop = greedy.text[2:4]
    code, out, err = run_cli(capsys, "--model", tiny_checkpoint, "--prompt", "Hello world",
                             "--maximum-tokens", 20, "--stop", stop, "--stop", "never-there")
    assert code == 0, err
    (r,) = records_of(out)
    assert r["finished"] is True and r["text"] == greedy.text[:greedy.text.find(stop)]
    assert r["length"] <= len(greedy.token_ids)


def test_finished_on_eos(capsys, tmp_path, tiny_tokenizer):
    """A model whose final LayerNorm output is a constant that the EOS row of the LM head matches."""
    model = make_hf_model(vocab_size=320, hidden_size=64, num_attention_heads=4, rotary_pct=0.25,
                          use_parallel_residual=True, hidden_act="gelu")
    with torch.no_grad():
        ln = model.gpt_neox.final_layer_norm
        ln.weight.zero_()
        ln.bias.copy_(torch.linspace(-1, 1, 64))
        model.get_output_embeddings().weight[0] = 10 * ln.bias
    d = tmp_path / "eos_model"
    save_hf(model, d)
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    code, out, err = run_cli(capsys, "--model", d, "--prompt", "Hello", "--maximum-tokens", 5)
    assert code == 0, err
    (r,) = records_of(out)
    assert r["finished"] is True and r["length"] == 0 and r["text"] == ""


def test_too_long_prompt_gives_null_record_and_run_goes_on(capsys, tmp_path, tiny_checkpoint):
    path = tmp_path / "p.txt"
    long_prompt = " ".join(["fox"] * 200)  # the fixture model has 128 positions
    path.write_text(f"Hello\n{long_prompt}\nThe quick\n")
    code, out, err = run_cli(capsys, "--model", tiny_checkpoint, "-i", path, "--maximum-tokens", 4)
    assert code == 0, err
    recs = records_of(out)
    assert [r["context"] for r in recs] == ["Hello", long_prompt, "The quick"]
    assert recs[1]["text"] is None and "128 positions" in recs[1]["message"] and recs[1]["length"] == 0
    assert recs[0]["text"] is not None and recs[2]["text"] is not None
    code, out, err = run_cli(capsys, "--model", tiny_checkpoint, "-i", path, "--maximum-tokens", 4, "--strict")
    check_error(code, err, "128 positions")


# -- resume and interruption --------------------------------------------------------------------------
def test_resume_after_killed_run(capsys, tmp_path, tiny_checkpoint, prompts_file):
    full = tmp_path / "full.jsonl"
    args = ["--model", tiny_checkpoint, "-i", prompts_file, "--maximum-tokens", 6, "--batch-size", 1]
    assert run_cli(capsys, *args, "-o", full)[0] == 0
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == len(PROMPTS)
    partial = tmp_path / "partial.jsonl"
    partial.write_text(lines[0] + lines[1] + lines[2][:25])  # killed while writing the third record
    code, out, err = run_cli(capsys, *args, "-o", partial, "--resume")
    assert code == 0, err
    assert "resuming: 2 prompts" in err and "incomplete" in err
    resumed = records_of(partial.read_text())
    assert [r["context"] for r in resumed] == PROMPTS  # no duplicates, nothing missing
    strip = lambda r: {k: v for k, v in r.items() if k != "duration_seconds"}  # noqa: E731
    assert [strip(r) for r in resumed] == [strip(r) for r in records_of(full.read_text())]
    # resuming a finished run does nothing; resuming against another input is refused
    before = partial.read_text()
    assert run_cli(capsys, *args, "-o", partial, "--resume")[0] == 0 and partial.read_text() == before
    other = tmp_path / "other.txt"
    other.write_text("something else\n")
    code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "-i", other, "-o", partial, "--resume")
    check_error(code, err, "cannot resume")


def test_interrupt_keeps_records(capsys, monkeypatch, tmp_path, tiny_checkpoint, prompts_file):
    calls = []
    original = neox_rt.NeoX.generate

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(neox_rt.NeoX, "generate", interrupted)
    out_path = tmp_path / "o.jsonl"
    code, out, err = run_cli(capsys, "--model", tiny_checkpoint, "-i", prompts_file, "-o", out_path,
                             "--maximum-tokens", 3, "--batch-size", 1)
    assert code == 130 and "Traceback" not in err
    assert [r["context"] for r in records_of(out_path.read_text())] == PROMPTS[:2]


# -- interactive ---------------------------------------------------------------------------------------
def test_interactive_through_a_pipe(tiny_checkpoint, api):
    """The real command, stdin a pipe: two prompts, an empty line (unconditional), then exit."""
    stdin = "Hello world\n\nThe quick\nexit\nnot read\n"
    proc = subprocess.run([sys.executable, "-m", "neox_rt.generate", "--model", tiny_checkpoint,
                           "--text-gen-type", "interactive", "--maximum-tokens", "8"],
                          input=stdin, capture_output=True, text=True, cwd=REPO, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert out.count("Context prompt >>> ") == 4
    for prompt in ("Hello world", "The quick"):
        assert api.generate(prompt, max_new_tokens=8).text in out
    assert "done: 3 prompts" in proc.stderr


def test_interactive_multiline_prompt_end_and_long_prompt(capsys, monkeypatch, tmp_path, tiny_checkpoint, api):
    import io
    long_prompt = " ".join(["fox"] * 200)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"line one\nline two<END>\n{long_prompt}<END>\nHello<END>\n"))
    out_path = tmp_path / "i.jsonl"
    code, out, err = run_cli(capsys, "--model", tiny_checkpoint, "--text-gen-type", "interactive",
                             "--prompt-end", "<END>", "--maximum-tokens", 6, "-o", out_path)
    assert code == 0, err  # EOF ends the loop cleanly
    assert "try a shorter prompt" in out  # the long prompt did not end the session
    recs = records_of(out_path.read_text())
    assert [r["context"] for r in recs] == ["line one\nline two", long_prompt, "Hello"]
    assert recs[0]["text"] == api.generate("line one\nline two", max_new_tokens=6).text
    assert recs[1]["text"] is None and recs[2]["text"] is not None


# -- configs ------------------------------------------------------------------------------------------
def test_yaml_config_drives_the_run(capsys, tmp_path, tiny_checkpoint, api, prompts_file):
    out_path = tmp_path / "from_config.jsonl"
    a = tmp_path / "a.yml"
    a.write_text(f"load: {tiny_checkpoint}\ntrain-iters: 10\noptimizer: {{type: Adam}}\n"
                 f"text-gen-type: unconditional\nmaximum_tokens: 50\n")
    b = tmp_path / "b.yml"
    b.write_text(f"sample-input-file: {prompts_file}\nsample_output_file: {out_path}\n"
                 f"text-gen-type: input-file\nmaximum-tokens: 7\nbatch_size: 8\nmysterious-key: 1\nseed: 7\n")
    code, out, err = run_cli(capsys, a, b, "--maximum-tokens", 5)  # the flag beats both files
    assert code == 0, err
    assert "mysterious-key" in err and "train-iters" not in err and "optimizer" not in err
    recs = records_of(out_path.read_text())
    # no sampling keys in the configs: gpt-neox's temperature 1.0, no top-k or top-p
    expected = api.generate(PROMPTS, max_new_tokens=5, temperature=1.0, seed=7)
    assert [r["text"] for r in recs] == [e.text for e in expected]


def test_model_shape_from_yaml_when_no_config_json(capsys, tmp_path, tiny_checkpoint, api):
    d = copy_checkpoint_without(tiny_checkpoint, tmp_path / "no_config_json", "config.json")
    cfg = tmp_path / "shape.yml"
    c = api.config
    cfg.write_text(f"load: {d}\nnum-layers: {c.num_hidden_layers}\nhidden-size: {c.hidden_size}\n"
                   f"num-attention-heads: {c.num_attention_heads}\nmax-position-embeddings: 128\n"
                   f"rotary-pct: 0.25\ngpt-j-residual: true\nno-weight-tying: true\n"
                   f"padded-vocab-size: {c.vocab_size}\npipe-parallel-size: 1\nmodel-parallel-size: 1\n")
    code, out, err = run_cli(capsys, cfg, "--prompt", "Hello world", "--maximum-tokens", 8, "--temperature", 0)
    assert code == 0, err
    assert records_of(out)[0]["text"] == api.generate("Hello world", max_new_tokens=8).text


def test_mode_selection(tmp_path):
    assert parse_settings([]).text_gen_type == "unconditional"
    assert parse_settings(["-i", "p.txt"]).text_gen_type == "input-file"
    assert parse_settings(["--prompt", "hi"]).text_gen_type == "input-file"
    cfg = tmp_path / "c.yml"
    cfg.write_text("text-gen-type: interactive\nsample-input-file: x.txt\n")
    assert parse_settings([str(cfg)]).text_gen_type == "interactive"
    assert parse_settings([str(cfg), "-i", "p.txt"]).text_gen_type == "input-file"
    s = parse_settings([str(cfg), "--text-gen-type", "unconditional", "--stop", "a", "--stop", "b",
                        "--prompt-end", "\\n---\\n"])
    assert s.text_gen_type == "unconditional" and s.stop == ("a", "b") and s.prompt_end == "\n---\n"


def test_help_documents_every_flag(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--tokenizer", "--sample-input-file", "--sample-output-file", "--text-gen-type",
                 "--num-samples", "--maximum-tokens", "--temperature", "--top-k", "--top-p", "--stop", "--seed",
                 "--prompt-end", "--recompute", "--return-logits", "--dtype", "--device", "--batch-size", "--tp",
                 "--prompt", "--resume", "--on-invalid-utf8", "--strict", "interactive", "greedy"):
        assert flag in out, flag


# -- bad input ------------------------------------------------------------------------------------------
@pytest.fixture
def bad_inputs(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    bad_utf8 = tmp_path / "bad_utf8.txt"
    bad_utf8.write_bytes(b"Hello\nbad \xff\xfe byte\nThe quick\n")
    no_tok = copy_checkpoint_without(tiny_checkpoint, tmp_path / "no_tokenizer", "tokenizer.json")
    malformed = tmp_path / "malformed.yml"
    malformed.write_text("num-layers: [2,\n")
    mode = tmp_path / "mode.yml"
    mode.write_text("text-gen-type: sideways\n")
    wrong_type = tmp_path / "wrong.yml"
    wrong_type.write_text("top_k: many\n")
    return dict(empty=empty, bad_utf8=bad_utf8, no_tok=no_tok, malformed=malformed, mode=mode,
                wrong_type=wrong_type, missing=tmp_path / "missing", dir=tmp_path)


BAD = [
    (["--model", "{missing}"], ["checkpoint directory not found"]),
    (["{missing}.yml"], ["config file not found"]),
    (["--model", "{ckpt}", "--tokenizer", "{missing}.json"], ["tokenizer not found"]),
    (["--model", "{no_tok}"], ["no tokenizer.json", "--tokenizer"]),
    (["--model", "{ckpt}", "-i", "{missing}.txt"], ["input file not found"]),
    (["--model", "{ckpt}", "-i", "{dir}"], ["is a directory"]),
    (["--model", "{ckpt}", "-i", "{empty}"], ["holds no prompts"]),
    (["--model", "{ckpt}", "-i", "{bad_utf8}"], ["line 2", "UTF-8"]),
    (["--model", "{ckpt}", "--maximum-tokens", "0"], ["maximum_tokens must be positive"]),
    (["--model", "{ckpt}", "--maximum-tokens", "500"], ["128 positions"]),
    (["--model", "{ckpt}", "--text-gen-type", "sideways"], ["--text-gen-type", "sideways"]),
    (["--model", "{ckpt}", "--quantize", "int4", "--quantize-lm-head", "int2"], ["--quantize-lm-head", "int2"]),
    (["{mode}"], ["unknown text-gen-type", "sideways"]),
    (["--model", "{ckpt}", "--top-p", "1.5"], ["top_p must be in [0, 1]"]),
    (["--model", "{ckpt}", "--top-p", "-0.1"], ["top_p"]),
    (["{malformed}"], ["not valid YAML", "malformed.yml"]),
    (["{wrong_type}"], ["'top_k'", "wrong.yml"]),
    (["--model", "{ckpt}", "-o", "{missing}/out.jsonl"], ["output directory does not exist"]),
    (["--model", "{ckpt}", "--resume"], ["--resume needs an output file"]),
    (["--model", "{ckpt}", "--temperature", "hot"], ["--temperature"]),
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], []),
]


@pytest.mark.parametrize("argv,needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input(capsys, bad_inputs, tiny_checkpoint, argv, needles):
    fill = {k: str(v) for k, v in bad_inputs.items()}
    fill["ckpt"] = tiny_checkpoint
    code, out, err = run_cli(capsys, *[a.format(**fill) for a in argv])
    check_error(code, err, *needles)
    assert out == ""


def test_invalid_utf8_skip(capsys, bad_inputs, tiny_checkpoint):
    code, out, err = run_cli(capsys, "--model", tiny_checkpoint, "-i", bad_inputs["bad_utf8"],
                             "--on-invalid-utf8", "skip", "--maximum-tokens", 3)
    assert code == 0, err
    assert "skipping line 2" in err
    assert [r["context"] for r in records_of(out)] == ["Hello", "The quick"]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "/nonexistent/neox_rt/checkpoint"], "checkpoint directory not found"),
    (["--maximum-tokens", "-3"], "maximum_tokens must be positive"),
])
def test_bad_input_subprocess(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "neox_rt.generate", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=300, stdin=subprocess.DEVNULL, env=subprocess_env())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and needle in proc.stderr
    assert proc.stderr.startswith("neox_rt: error: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_tensor_parallel_two_cpu_ranks(tmp_path, tiny_checkpoint, prompts_file):
    """torchrun with --tp 2 on gloo: rank 0 alone reads the prompts and writes each record once."""
    import socket
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out_path = tmp_path / "tp2.jsonl"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", port, "-m", "neox_rt.generate", "--model", tiny_checkpoint,
                           "--tp", "2", "--device", "cpu", "-i", prompts_file, "-o", str(out_path),
                           "--maximum-tokens", "6", "--batch-size", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=subprocess_env(),
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    recs = records_of(out_path.read_text())
    assert [r["context"] for r in recs] == PROMPTS  # once each, in order
    for r in recs:
        check_record(r)
        assert r["finished"] == (r["length"] < 6)
    assert proc.stderr.count("done: 5 prompts") == 1 and "tp 2" in proc.stderr


@pytest.mark.gpu
def test_gpu_defaults_and_greedy_equal_to_api(capsys, tmp_path, tiny_checkpoint, prompts_file):
    """On CUDA: device and dtype defaults (cuda, float16), batch default, records equal to the Python API."""
    out_path = tmp_path / "gpu.jsonl"
    code, out, err = run_cli(capsys, "--model", tiny_checkpoint, "-i", prompts_file, "-o", out_path,
                             "--maximum-tokens", 12)
    assert code == 0, err
    assert "cuda float16" in err
    model = neox_rt.load(tiny_checkpoint, dtype="float16", device="cuda", progress=False)
    expected = model.generate(PROMPTS, max_new_tokens=12)  # 5 prompts: one batch of the default 8
    recs = records_of(out_path.read_text())
    assert [r["context"] for r in recs] == PROMPTS
    for r, e in zip(recs, expected):
        assert r["text"] == e.text and r["length"] == len(e.token_ids) and r["finished"] == e.finished
    code, out, err = run_cli(capsys, "--num-samples", 2, "--maximum-tokens", 16, "--temperature", 0.8, "--seed", 1)
    assert code == 0, err
    assert "cuda float16" in err and len(records_of(out)) == 2
