"""Every client command, given anything, prints one line per error and exits with a documented code:
never a Python traceback. The faults first found by hand, then a fuzz test of every client command
with random arguments, argument bytes and file contents."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from producer.cli import main
from producer.client import JobClient
from producer.enqueue import new_job_id
from producer.errors import InvalidRequestError
from producer.schemas import parse_request
from producer.settings import Settings
from tests.test_cli import NO_GPU_STACK, cli

EXIT_CODES = {0, 1, 2, 3, 4}


def one_line_error(done: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout and "this is a bug" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


@pytest.mark.parametrize(("value", "fragment"), [("Infinity", "deadline must be a finite number"), ("-Infinity", "deadline must be a finite number"),
                                                 ("NaN", "deadline must be a finite number")])
def test_a_deadline_that_is_not_a_finite_number_is_refused(redis_server, value, fragment):
    one_line_error(cli(redis_server.url, "submit", "--prompt", "hi", "--set", f"deadline={value}"), 2, fragment)


def test_the_python_clients_refuse_non_finite_numbers():
    for value in (float("inf"), float("nan")):
        with pytest.raises(InvalidRequestError, match="deadline must be a finite number"):
            parse_request({"prompt": "hi", "deadline": value})
    with pytest.raises(InvalidRequestError, match=r"temperature must be in \[0.1, 2.0\], got inf"):
        parse_request({"prompt": "hi", "temperature": float("inf")})
    with pytest.raises(InvalidRequestError, match="metadata must be a JSON object of plain values"):
        parse_request({"prompt": "hi", "metadata": {"x": float("nan")}})


@pytest.mark.parametrize(("content", "fragment"), [
    (b"not json at all", "it is not JSON"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "it is not UTF-8 text"),
    (b"", "it is empty"),
    (b"  \n\t ", "it is empty"),
    (b"[" * 100_000 + b"]" * 100_000, "it nests too deeply to read"),
    (b'{"role": "user"}', "messages must be a list"),
])
def test_a_messages_file_that_is_not_a_json_list_is_refused_in_one_line(redis_server, tmp_path, content, fragment):
    path = tmp_path / "messages.json"
    path.write_bytes(content)
    one_line_error(cli(redis_server.url, "submit", "--messages", str(path)), 2, "--messages" if "messages must" not in fragment else "", fragment)


def test_a_messages_file_that_cannot_be_read_is_refused(redis_server, tmp_path):
    one_line_error(cli(redis_server.url, "submit", "--messages", str(tmp_path / "absent.json")), 2, "--messages", "cannot read it")


def test_a_job_id_that_is_not_utf8_or_not_an_id_is_refused(redis_server):
    for command in ("result", "status", "cancel", "watch"):
        done = subprocess.run([sys.executable, "-c", NO_GPU_STACK, "--redis-url", redis_server.url, command, b"\xff"], capture_output=True, text=True,
                              timeout=60)
        one_line_error(done, 2, "job_id must be 1 to 64 letters")
    one_line_error(cli(redis_server.url, "status", "a/b"), 2, "job_id must be")
    one_line_error(cli(redis_server.url, "batch", "status", "../x"), 2, "batch_id must be")


def test_tls_against_a_plain_text_redis_is_one_line_and_exits_4(redis_server):
    done = cli(redis_server.url.replace("redis://", "rediss://"), "status", "x", timeout=120)
    one_line_error(done, 4, "rediss://", "redis://")


@pytest.mark.parametrize("url", ["foo://localhost", "redis://localhost:99999/0", "redis://localhost:port/0", "redis://[::1/0"])
def test_a_redis_url_that_is_not_usable_is_refused(url):
    one_line_error(cli(url, "status", "x"), 2, "the Redis URL (--redis-url or BELLE_REDIS_URL) is not usable")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\r\n"])
def test_an_empty_batch_file_is_a_refused_input(redis_server, tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    one_line_error(cli(redis_server.url, "batch", "submit", str(path)), 2, "nothing to submit", "empty")


def test_a_batch_file_that_cannot_be_read_is_a_refused_input(redis_server, tmp_path):
    one_line_error(cli(redis_server.url, "batch", "submit", str(tmp_path / "absent.jsonl")), 2, "cannot read the batch file")


def test_refusals_name_the_key_and_its_path_and_the_setting_to_raise(redis_server, tmp_path):
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi", "contnet": "x"}]))
    one_line_error(cli(redis_server.url, "submit", "--messages", str(path)), 2, "unknown field 'contnet' in messages[0]; did you mean 'content'?")
    done = cli(redis_server.url, "submit", "--prompt", "hi", "--set", f"stop={json.dumps(['x' * 65])}")
    one_line_error(done, 2, "stop[0] must be at most 64 characters, got 65", "BELLE_MAX_STOP_CHARS")
    assert "BELLE_MAX_PROMPT_CHARS" not in done.stderr


@pytest.mark.parametrize(("field", "value"), [("prompt", "nul\x00inside"), ("prompt", "escape \x1b[31m red"), ("stop", ["\x07"]),
                                              ("messages", [{"role": "user", "content": "bell \x07"}])])
def test_control_characters_in_text_are_refused_with_their_position(field, value):
    with pytest.raises(InvalidRequestError, match=r"must not hold control characters other than tab, newline and carriage return, got U\+00"):
        parse_request({"prompt": "hi", field: value} if field != "prompt" else {field: value})


def test_tabs_newlines_and_carriage_returns_are_text():
    assert parse_request({"prompt": "a\tb\r\nc", "stop": ["\n\n"]}).prompt == "a\tb\r\nc"


def test_metadata_nested_too_deeply_is_refused_before_anything_recurses(redis_server):
    deep: object = "leaf"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(InvalidRequestError, match="metadata must nest at most 32 levels"):
        parse_request({"prompt": "hi", "metadata": {"x": deep}})
    one_line_error(cli(redis_server.url, "submit", "--prompt", "hi", "--set", "metadata=" + "[" * 50_000 + "]" * 50_000), 2, "nests too deeply")


def test_wait_and_timeout_take_a_finite_number_of_seconds(redis_server):
    for value in ("inf", "nan", "-1", "soon"):
        done = cli(redis_server.url, "result", "x", "--wait", value)
        assert done.returncode == 2 and "--wait" in done.stderr and "Traceback" not in done.stderr, done.stderr


# --- the fuzz test ---

def printable(text: str) -> bool:
    """What a command line can carry: no NUL byte."""
    return "\x00" not in text


arg_text = st.one_of(
    st.text(max_size=40).filter(printable),
    st.binary(max_size=20).map(os.fsdecode).filter(printable),  # bytes that are not UTF-8 arrive as surrogates
    st.sampled_from(["", "-", "--", "0", "-1", "1e309", "nan", "inf", "null", "true", "[]", "{}", '"x"', "x" * 5000, "Ω", "--json"]),
)
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)
set_value = st.one_of(
    st.tuples(st.sampled_from(["temperature", "max_new_tokens", "num_beams", "deadline", "stop", "metadata", "seed", "stream", "prompt", "adapter",
                               "messages", "temprature", "", "=", "Ω"]),
              st.one_of(arg_text, json_value.map(lambda v: json.dumps(v)))).map(lambda kv: f"{kv[0]}={kv[1]}"),
    arg_text,
)
seconds = st.sampled_from(["0", "0.01", "0.05", "-1", "nan", "inf", "1e309", "soon", ""])
file_content = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(json_value.map(json.dumps), st.text(max_size=30), st.just(json.dumps({"prompt": "hi", "num_beams": 1}))), max_size=6)
      .map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"\n\n", b"[" * 20_000, json.dumps([{"role": "user", "content": "hi"}]).encode(),
                     b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}']),
)


@st.composite
def command_lines(draw, url: str, job_ids: list[str], batch_ids: list[str], folder: str) -> list[str]:
    def a_file() -> str:
        path = os.path.join(folder, f"f{draw(st.integers(0, 5))}")
        with open(path, "wb") as f:
            f.write(draw(file_content))
        return draw(st.sampled_from([path, path, os.path.join(folder, "absent"), folder]))

    job = st.one_of(st.sampled_from(job_ids), arg_text)
    batch = st.one_of(st.sampled_from(batch_ids), arg_text)
    command = draw(st.sampled_from(["submit", "watch", "cancel", "status", "result", "workers", "presets", "batch submit", "batch status",
                                    "batch results", "batch cancel"]))
    argv = command.split()
    options: list[list[str]] = []
    if command == "submit":
        options += [["--prompt", draw(arg_text)]] * draw(st.integers(0, 1))
        options += [["--messages", a_file()]] * draw(st.integers(0, 1))
        options += [["--set", draw(set_value)] for _ in range(draw(st.integers(0, 3)))]
        options += [["--preset", draw(st.one_of(st.sampled_from(["greedy", "streaming", "basic_qa"]), arg_text))]] * draw(st.integers(0, 1))
        options += [["--wait", draw(seconds)]] * draw(st.integers(0, 1))
        if draw(st.booleans()):
            options += [["--stream"], ["--timeout", draw(seconds)]]
        options += [[flag] for flag in draw(st.lists(st.sampled_from(["--json", "--check-workers"]), max_size=2))]
    elif command in ("watch", "cancel", "status", "result"):
        argv.append(draw(job))
        if command == "watch":
            options.append(["--timeout", draw(seconds)])
        if command == "result" and draw(st.booleans()):
            options.append(["--wait", draw(seconds)])
        options += [["--json"]] * draw(st.integers(0, 1))
    elif command == "batch submit":
        argv.append(a_file())
        options += [["--set", draw(set_value)] for _ in range(draw(st.integers(0, 2)))]
        options += [[flag] for flag in draw(st.lists(st.sampled_from(["--skip-invalid", "--new", "--json", "--no-progress"]), max_size=3))]
        options += [["--completion-window", draw(st.one_of(st.sampled_from(["24h", "90m", "0", "-1h", "1e400d"]), arg_text))]] * draw(st.integers(0, 1))
        options += [["--batch-id", draw(batch)]] * draw(st.integers(0, 1))
        options += [["--refusals", os.path.join(folder, draw(st.sampled_from(["r.jsonl", "absent/r.jsonl"])))]] * draw(st.integers(0, 1))
    elif command.startswith("batch "):
        argv.append(draw(batch))
        if command == "batch results":
            options += [["-o", os.path.join(folder, draw(st.sampled_from(["out.jsonl", "absent/out.jsonl", "-"])))]] * draw(st.integers(0, 1))
    options += [[draw(arg_text)]] * draw(st.sampled_from([0, 0, 0, 1]))  # a stray argument
    for option in draw(st.permutations(options)):
        argv += option
    redis_url = draw(st.sampled_from([url, url, url, url, "redis://127.0.0.1:1/0", "nope://x", "redis://127.0.0.1:99999/0"]))
    return ["--redis-url", redis_url, *argv]


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """main(argv) with the real streams' encodings: stdout strict UTF-8, stderr backslashreplace."""
    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict")
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace")
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: usage errors (2), --help (0)
            code = exit_.code if isinstance(exit_.code, int) else 1
        out.flush()
        err.flush()
    return code, (out_bytes.getvalue() + err_bytes.getvalue()).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def quiet_url(new_database) -> str:
    """A database no worker serves: jobs submitted there stay queued."""
    return new_database()


def test_fuzz_every_client_command(quiet_url, tmp_path):
    url = quiet_url
    with JobClient(Settings(redis_url=url)) as client:
        queued = client.submit({"prompt": "never runs"})  # (no worker serves this database)
        batch = client.submit_batch([{"custom_id": "a", "prompt": "hi", "num_beams": 1}]).batch_id
    job_ids, batch_ids = [queued, new_job_id(), "no-such-job"], [batch, "no-such-batch"]
    seen: dict[int, int] = {}

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(command_lines(url, job_ids, batch_ids, str(tmp_path)))
    # (each main outcome once for sure, whatever the random draws reach: success, not found, usage, Redis out of reach)
    @example(["--redis-url", url, "status", queued])
    @example(["--redis-url", url, "status", "no-such-job"])
    @example(["--redis-url", url, "status"])
    @example(["--redis-url", "redis://127.0.0.1:1/0", "status", queued])
    def fuzz(argv):
        code, output = run_in_process(argv)
        assert code in EXIT_CODES, (argv, code, output)
        assert "Traceback" not in output and "this is a bug" not in output, (argv, output)
        seen[code] = seen.get(code, 0) + 1

    fuzz()
    assert {0, 1, 2, 4} <= set(seen), f"the fuzzing reached success and the main refusals: {seen}"


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(min_size=0, max_size=12).filter(lambda b: b"\x00" not in b), min_size=1, max_size=4),
       st.sampled_from(["submit", "status", "result", "cancel", "batch"]))
def test_fuzz_raw_argument_bytes_through_a_real_process(quiet_url, args, command):
    """As a shell passes them: bytes, decoded by Python itself, printed through the real streams."""
    done = subprocess.run([sys.executable, "-c", NO_GPU_STACK, "--redis-url", quiet_url, command, *args,
                           *(["--wait", "0"] if command == "result" else [])], capture_output=True, timeout=60)
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode in EXIT_CODES, (args, done.returncode, stderr)
    assert "Traceback" not in stderr and "this is a bug" not in stderr, (args, stderr)


def test_a_batch_line_nested_too_deeply_is_a_refused_line(redis_server, tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "num_beams": 1}) + "\n" + "[" * 20_000 + "]" * 20_000 + "\n")
    one_line_error(cli(redis_server.url, "batch", "submit", str(path)), 2, "line 2: not JSON: it nests too deeply to read")
