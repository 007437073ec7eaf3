"""The README and the docs cannot go stale.

* Every ``console`` and ``python`` block runs against a real ``bentoml serve`` (one
  server for this module; the management routes' examples get a second one, with an
  admin key and a second model version), and what each shows is compared with what
  the server answers (``tests/doc_examples.py`` says how). A block that is not run says
  why, in a ``<!-- not run: ... -->`` line before it; a shell block that calls the
  service without one fails.
* Every ``python -m training.X ...`` command in a block or in the prose is parsed by that
  module's own parser, so a flag that is removed or renamed fails; the released models'
  documented commands are the ones their ``metadata.json`` records.
* The README's figures (test results, artifact sizes, served versions) are the
  artifacts', and its links lead to pages and headings that exist.

The site itself (every page in the nav, every link and anchor) is checked by
``make docs`` (``mkdocs build --strict``), which ``make test`` runs first.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, TEST_SERVICE_ENV, free_port
from tests.doc_examples import (
    RUN_LANGUAGES,
    SHELL_LANGUAGES,
    Block,
    blocks,
    console_commands,
    output_mismatch,
    prose,
    run_python,
)
from tests.tool_envs import tool_python

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
DOC_FILES = [README, *sorted(DOCS.glob("*.md"))]
ALL_BLOCKS = [block for path in DOC_FILES for block in blocks(path)]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.lang in RUN_LANGUAGES and not block.not_run]
SERVICE_TARGET = "service.service:ServingService"
# The docs show the service on its usual ports; the test servers listen elsewhere.
HTTP_ADDRESS = re.compile(r"(?:localhost|127\.0\.0\.1):3000\b")
GRPC_ADDRESS = re.compile(r"(?:localhost|127\.0\.0\.1):8001\b")
CALLS_THE_SERVICE = re.compile(r"\bcurl\b|(?:localhost|127\.0\.0\.1):(?:3000|8001)\b")
# The management examples' second version of mnist-cnn: the release with this file added.
COPY_NOTE = "a copy of the release, for the documentation's examples\n"


def needs_admin(block: Block) -> bool:
    return "/admin/" in block.text or "ADMIN_KEY" in block.text


def rewrite(text: str, http_port: int, grpc_port: int | None) -> str:
    text = HTTP_ADDRESS.sub(f"127.0.0.1:{http_port}", text)
    return GRPC_ADDRESS.sub(f"127.0.0.1:{grpc_port}", text) if grpc_port else text


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Where an example runs: like the repository root, for ``examples/``."""
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    return tmp_path


# --- what runs, and what says why not ------------------------------------------------------


def test_the_docs_have_examples_that_run():
    names = {block.path.name for block in RUN_BLOCKS}
    assert {"README.md", "api.md", "protocols.md", "management.md"} <= names
    assert {block.lang for block in RUN_BLOCKS if block.path == README} == {"console", "python"}


def test_a_block_not_run_says_why_and_one_that_calls_the_service_runs():
    for path in DOC_FILES:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.strip().startswith("<!-- not run"):
                following = lines[number + 1] if number + 1 < len(lines) else ""
                assert following.lstrip().startswith(("```", "~~~")), (
                    f"{path.name}:{number + 1}: a not-run mark belongs right before a block"
                )
    for block in ALL_BLOCKS:
        if block.not_run is not None:
            assert block.not_run, f"{block.name}: say why the block is not run"
            continue
        if block.lang == "console":
            assert console_commands(block.text), f"{block.name}: a console block without `$ `"
        elif block.lang == "python":
            compile(block.text, block.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        elif block.lang in SHELL_LANGUAGES or block.lang == "":
            code = re.sub(r"(^|\s)#.*", "", block.text)
            assert not CALLS_THE_SERVICE.search(code), (
                f"{block.name} calls the service: make it a console block with what it "
                "answers, or mark it <!-- not run: reason -->"
            )


# --- the servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc_server(serve, model_store):
    """The released models, as `make serve` serves them, with gRPC on."""
    grpc_port = free_port()
    server = serve(SERVICE_TARGET, {**TEST_SERVICE_ENV, "SERVING_GRPC_PORT": str(grpc_port)})
    server.grpc_port = grpc_port
    yield server
    server.stop()


@pytest.fixture(scope="module")
def managed_server(serve, model_store, tmp_path_factory):
    """A server with an admin key, a client key and a second version of mnist-cnn in the
    store (removed again afterwards); the keys are in ``server.keys``."""
    import bentoml

    from models.artifacts import refresh_checksums
    from service.api_keys import digest
    from training.register import register_all

    place = tmp_path_factory.mktemp("managed")
    copy = place / "artifacts" / "mnist-cnn"
    shutil.copytree(REPO_ROOT / "models" / "artifacts" / "mnist-cnn", copy)
    (copy / "notes.txt").write_text(COPY_NOTE)
    refresh_checksums(copy)
    (tag,) = register_all(["mnist-cnn"], place / "artifacts")
    assert tag.version in (DOCS / "management.md").read_text(), (
        f"docs/management.md's second version of mnist-cnn is now {tag.version}"
    )
    keys = {"ADMIN_KEY": secrets.token_urlsafe(24), "CLIENT_KEY": secrets.token_urlsafe(24)}
    (place / "api-keys").write_text(
        f"ops admin sha256:{digest(keys['ADMIN_KEY']).hex()}\n"
        f"client infer sha256:{digest(keys['CLIENT_KEY']).hex()}\n"
    )
    server = serve(SERVICE_TARGET, {**TEST_SERVICE_ENV,
                                    "SERVING_API_KEYS_FILE": str(place / "api-keys"),
                                    "SERVING_STATE_DIR": str(place / "state")})  # fmt: skip
    server.keys, server.grpc_port = keys, None
    yield server
    server.stop()
    bentoml.models.delete(str(tag))


def server_for(block: Block, request: pytest.FixtureRequest):
    return request.getfixturevalue("managed_server" if needs_admin(block) else "doc_server")


# --- console and python blocks ------------------------------------------------------------


@pytest.mark.parametrize(
    "block", [b for b in RUN_BLOCKS if b.lang == "console"], ids=lambda block: block.name
)
def test_console_example(block: Block, request, workdir):
    server = server_for(block, request)
    pairs = console_commands(block.text)
    script = []
    for index, (command, _) in enumerate(pairs):
        command = rewrite(command, server.port, server.grpc_port)
        script.append(f'{{\n{command}\n}} >"$DOC_OUT/{index}.out" 2>"$DOC_OUT/{index}.err"\n'
                      f'echo $? >"$DOC_OUT/{index}.rc"')  # fmt: skip
    out = workdir / ".out"
    out.mkdir()
    env = {**os.environ, **getattr(server, "keys", {}), "DOC_OUT": str(out)}
    subprocess.run(["bash", "-c", "\n".join(script)], cwd=workdir, env=env, timeout=300,
                   check=True)  # fmt: skip
    problems = []
    for index, (command, shown) in enumerate(pairs):
        status = int((out / f"{index}.rc").read_text())
        answer = (out / f"{index}.out").read_text()
        if status != 0:
            errors = (out / f"{index}.err").read_text()
            problems.append(f"`{command}` exited {status}: {errors[-2000:]}")
        elif problem := output_mismatch(answer, shown):
            problems.append(f"`{command}`: {problem}\n{answer[:3000]}")
    assert not problems, f"{block.name}:\n" + "\n\n".join(problems)


@pytest.mark.parametrize(
    "block", [b for b in RUN_BLOCKS if b.lang == "python"], ids=lambda block: block.name
)
def test_python_example(block: Block, request, workdir, monkeypatch):
    server = server_for(block, request)
    source = rewrite(block.text, server.port, server.grpc_port)
    if re.search(r"^\s*(from|import) kserve\b", source, re.MULTILINE):
        python = tool_python("KSERVE_VENV", ".venv-kserve", "kserve-venv")
        script = workdir / "example.py"
        script.write_text(source)
        done = subprocess.run([str(python), str(REPO_ROOT / "tests" / "doc_examples.py"),
                               "python", str(script)], cwd=workdir, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, f"{block.name}: {done.stderr[-3000:]}"
        report = json.loads(done.stdout.splitlines()[-1])
        checked, problems = report["checked"], report["problems"]
    else:
        monkeypatch.chdir(workdir)
        checked, problems = run_python(source, block.name)
    assert checked, f"{block.name} shows no value to compare"
    assert not problems, f"{block.name}:\n" + "\n".join(problems)


# --- training commands --------------------------------------------------------------------


def shell_lines(block: Block) -> list[str]:
    if block.lang == "console":
        return [command.replace("\\\n", " ") for command, _ in console_commands(block.text)]
    return block.text.replace("\\\n", " ").splitlines()


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) of every line or code span that runs ``-m training.X``."""
    found = []
    for path in DOC_FILES:
        for block in blocks(path):
            if block.lang in SHELL_LANGUAGES or block.lang == "":
                found += [(block.name, line) for line in shell_lines(block)
                          if "-m training." in line]  # fmt: skip
        for span in re.findall(r"`([^`]+)`", prose(path)):
            if "-m training." in span:
                found.append((path.name, " ".join(span.split())))
    return found


def invocations(line: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(module, arguments, environment) of each ``-m training.X`` in a shell line."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("();<>|&"):
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for tokens in segments:
        env = {}
        while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
            name, _, value = tokens.pop(0).partition("=")
            env[name] = value
        for index, token in enumerate(tokens[:-1]):
            if token == "-m" and tokens[index + 1].startswith("training."):
                # [--option value] marks an optional part; $name stands for a value.
                argv = [re.sub(r"\$\{?\w+\}?", "1", t.strip("[]")) for t in tokens[index + 2 :]]
                found.append((tokens[index + 1], [t for t in argv if t], env))
    return found


class _Parsed(BaseException):  # not an Exception: passes torchrun's error recorder
    pass


def parse_command(module_name: str, argv: list[str], env: dict[str, str], monkeypatch) -> None:
    """Run the module's ``main(argv)`` up to its argument parsing; fail on an error."""
    from models.registry import REGISTRY

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if "MODEL_SPECS" in env:  # a model of one's own: the docs' example is the test's
        monkeypatch.syspath_prepend(str(REPO_ROOT / "tests" / "extra_model"))
    REGISTRY.reload()
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        # A real file: torchrun's error recorder wants a file descriptor for stderr.
        with tempfile.TemporaryFile("w+") as errors, contextlib.redirect_stderr(errors):
            try:
                importlib.import_module(module_name).main(argv)
            except SystemExit:
                errors.seek(0)
                message = errors.read()
            else:
                message = "main returned without parsing its arguments"
    except _Parsed:
        return
    finally:
        monkeypatch.undo()
        REGISTRY.reload()
    pytest.fail(f"python -m {module_name} {shlex.join(argv)}: {message}")


DOCUMENTED = documented_commands()


def test_the_docs_name_training_commands():
    modules = {module for _, line in DOCUMENTED for module, _, _ in invocations(line)}
    assert {"training.mnist", "training.sentiment", "training.gan", "training.pipeline",
            "training.register", "training.verify", "training.drawn_digits"} <= modules  # fmt: skip


@pytest.mark.parametrize(
    ("where", "line"), DOCUMENTED, ids=[f"{where} {line[:50]}" for where, line in DOCUMENTED]
)
def test_a_documented_training_command_parses(where, line, monkeypatch):
    calls = invocations(line)
    assert calls, f"{where}: no `-m training.X` found in {line!r}"
    for module, argv, env in calls:
        parse_command(module, argv, env, monkeypatch)


def test_the_released_models_documented_commands_are_the_recorded_ones(release_artifacts):
    from models.artifacts import METADATA_FILE, read_json
    from models.registry import RELEASED

    ignored = {"output_dir", "teachers", "data_dir", "checkpoint_dir"}
    documented = [call for where, line in DOCUMENTED if where.startswith("models.md")
                  for call in invocations(line)]  # fmt: skip
    for spec in RELEASED:
        recorded = read_json(release_artifacts / spec.name / METADATA_FILE)["training"]["command"]
        ((module, argv, _),) = invocations(recorded)
        assert module == spec.training
        parser = importlib.import_module(module).build_parser()

        def config(arguments, parser=parser):
            values = vars(parser.parse_args(arguments))
            return {k: v for k, v in values.items() if k not in ignored}, bool(
                values.get("teachers")
            )

        candidates = [config(a) for m, a, _ in documented if m == module]
        assert config(argv) in candidates, (
            f"docs/models.md has no command for {spec.name} that trains as `{recorded}`"
        )


# --- the README's figures and links -------------------------------------------------------

FIGURES = {"mnist-cnn": "test_accuracy", "sst2-bilstm": "test_accuracy",
           "digit-gan": "conditional_accuracy"}  # fmt: skip


def megabytes(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_readme_states_the_artifacts_figures(release_artifacts, model_store):
    from models.artifacts import METADATA_FILE, ONNX_FILE, WEIGHTS_FILE, read_json
    from models.served import SERVED_MODELS_FILE

    readme, index = README.read_text(), (DOCS / "index.md").read_text()
    models_page = table_rows((DOCS / "models.md").read_text())
    rows = table_rows(readme)
    pins = json.loads(SERVED_MODELS_FILE.read_text())
    total = 0
    for name, key in FIGURES.items():
        directory = release_artifacts / name
        figure = f"{read_json(directory / METADATA_FILE)['metrics'][key] * 100:.2f} %"
        version = model_store[name].split(":")[1]
        _, _, test, sizes, served = rows[name]
        assert f"**{figure}**" in test, (name, test)
        weights, onnx = megabytes(directory / WEIGHTS_FILE), megabytes(directory / ONNX_FILE)
        assert sizes == f"{weights} / {onnx}", (name, sizes)
        assert served == f"`{version}`" and pins[name] == f"{name}:{version}"
        assert f"**{figure}**" in models_page[name][2], ("docs/models.md", name)
        assert f"{weights} weights" in models_page[name][3], ("docs/models.md", name)
        if key == "test_accuracy":
            assert f"({figure} on" in index, ("docs/index.md", name)
        total += sum(path.stat().st_size for path in directory.iterdir() if path.is_file())
    assert f"({total / 1e6:.1f} MB for all three" in readme
    assert f"All three together: {total / 1e6:.1f} MB" in (DOCS / "models.md").read_text()


def heading_anchors(path: Path) -> set[str]:
    from markdown.extensions.toc import slugify

    anchors = set()
    for line in prose(path).splitlines():
        if line.startswith("#"):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line.lstrip("#").strip())
            anchors.add(slugify(text.replace("`", "").replace("*", ""), "-"))
    return anchors


def test_the_readme_links_lead_somewhere():
    links = re.findall(r"\]\(([^)\s]+)\)", prose(README))
    assert len(links) >= 10
    for link in links:
        if re.match(r"^[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (README.parent / target).resolve()
        assert path.is_file(), f"README links to {link}: no such file"
        if anchor:
            assert anchor in heading_anchors(path), f"README links to {link}: no such heading"


def test_the_pins_are_named_where_they_are():
    """Docs and docstrings that give the pins' path give the real one."""
    from models.served import SERVED_MODELS_FILE

    real = SERVED_MODELS_FILE.relative_to(REPO_ROOT).as_posix()
    sources = [*DOC_FILES, *[path for room in ("models", "training", "service")
                             for path in (REPO_ROOT / room).glob("*.py")]]  # fmt: skip
    for path in sources:
        for named in re.findall(
            r"[\w./-]*/" + re.escape(SERVED_MODELS_FILE.name), path.read_text()
        ):
            assert named == real, f"{path.relative_to(REPO_ROOT)} names the pins {named}"
