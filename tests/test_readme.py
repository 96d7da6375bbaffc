"""Every code block of README.md works (issue 9). Blocks are read from the README, so new ones are picked up.

- Every fenced block has a language tag: ``python``, ``bash`` and ``yaml`` are tested, ``text`` is for trees and
  output. A block may be exempted only by an HTML comment on the line before it naming why:
  ``<!-- readme-test: skip (needs a GPU) -->``.
- ``python``: runs as a script in a fresh subprocess (cwd: a temporary directory) with ``PL_TRAINER_FAST_DEV_RUN=1``
  (Lightning's Trainer reads ``PL_TRAINER_<ARG>`` defaults from the environment) and ``EQL_DATA_ROOT`` set.
- ``yaml``: parses; a fragment of a CLI config (``trainer``/``model``/``data`` keys) must be accepted by
  ``python cli.py fit --config configs/quickstart.yaml --config <fragment> --print_config``.
- ``bash``: lines starting with ``python cli.py`` or ``eqlightning`` run from the repository root (exit code 0),
  with ``--trainer.fast_dev_run 1 --run_root <tmp>`` appended for fit/validate/test/predict. ``runs/.../<run>/...``
  placeholders are resolved against that run root; a checkpoint that is not there yet (or one for
  ``--ckpt_path last``) comes from a one-epoch fit of the same configuration first. Other lines are not run, but
  the files they name must exist, ``make`` targets must be in the Makefile, and the README's ``pip install`` blocks
  must appear verbatim in ``.ci/run`` (CI runs them).

Data: ``$EQL_DATA_ROOT``, else ``../shared/data/medmnist`` next to the repository; without either, blocks that need
a dataset other than BreastMNIST-28 (which ships in the package) are skipped. Subprocesses run two at a time
(started together by the ``jobs`` fixture); the tests that wait for them are marked slow, the structural checks
(language tags, skip reasons, files, make targets, install lines in .ci/run) are quick and unmarked.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_SCRIPT = REPO / ".ci" / "run"

TESTED = ("python", "bash", "yaml")
LANGUAGES = (*TESTED, "text")  # text: directory trees, sample output
CLI_KEYS = {"trainer", "model", "data"}
TRAINER_SUBCOMMANDS = {"fit", "validate", "test", "predict"}
FAST = ["--trainer.fast_dev_run", "1"]
TINY_FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--test_after_fit", "false"]
WORKERS = 2
TIMEOUT_S = 300

FENCE = re.compile(r"^```\s*(\S*)\s*$")
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
SKIP = re.compile(r"^skip\s*(?:\((.*)\))?$")
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PATH_LIKE = re.compile(r"^[\w.][\w.+\-/]*$")
FILE_SUFFIX = re.compile(r"\.(py|ya?ml|sh|txt|cfg|toml|json|md|npz|csv|ckpt)$")
OUTPUT_OPTIONS = {"--out", "--output", "-o", "--run_root"}
#: 2D MedMNIST flags (a README block naming one of them, or a size other than 28, needs the data root).
FLAGS = ("pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
         "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist")
FLAG_RE = re.compile(rf"\b({'|'.join(FLAGS)})(_\d+)?\b", re.IGNORECASE)
SIZE_RE = re.compile(r"\bsize[\"']?\s*[=:]?\s*(\d+)")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    marker: str | None  # text of a readme-test comment right before the fence

    @property
    def id(self) -> str:
        return f"{self.lang or 'untagged'}-L{self.line}"

    @property
    def skip_reason(self) -> str | None:
        """None: run it. A string (maybe empty: then the test of reasons fails): why it is not run."""
        match = SKIP.match(self.marker or "")
        return None if match is None else (match.group(1) or "").strip()


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, i, previous = [], 0, ""
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if opening is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md:{i + 1}: code block never closed"
        marker = MARKER.fullmatch(previous)
        blocks.append(Block(opening.group(1).lower(), "\n".join(lines[i + 1:end]) + "\n", i + 1,
                            marker.group(1) if marker else None))
        i, previous = end + 1, ""
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: ``\\``-continued lines joined, comments stripped, ``&&``/``;`` split."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        current: list[str] = []
        for token in shlex.split(line, comments=True):
            if token in ("&&", ";", "||"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def split_env(command: list[str]) -> tuple[dict[str, str], list[str]]:
    env, i = {}, 0
    while i < len(command) and ASSIGNMENT.match(command[i]):
        name, value = command[i].split("=", 1)
        env[name] = value
        i += 1
    return env, command[i:]


def cli_args(command: list[str]) -> list[str] | None:
    """The CLI arguments of ``python cli.py ...`` / ``eqlightning ...``, or None for any other command."""
    _, command = split_env(command)
    if len(command) >= 2 and command[0] in ("python", "python3") and command[1] == "cli.py":
        return command[2:]
    if command and command[0] == "eqlightning":
        return command[1:]
    return None


def console_script() -> str:
    script = Path(sys.executable).parent / "eqlightning"
    return str(script) if script.exists() else "eqlightning"


def data_root() -> Path | None:
    if os.environ.get("EQL_DATA_ROOT"):
        return Path(os.environ["EQL_DATA_ROOT"])
    shared = REPO.parent / "shared" / "data" / "medmnist"
    return shared if shared.is_dir() else None


def needs_data_root(text: str) -> bool:
    """Whether ``text`` names a MedMNIST dataset other than BreastMNIST-28 (the one shipped in the package)."""
    for match in FLAG_RE.finditer(text):
        if match.group(1).lower() != "breastmnist" or (match.group(2) and match.group(2) != "_28"):
            return True
    return any(int(size) != 28 for size in SIZE_RE.findall(text))


def config_text(args: list[str]) -> str:
    """The text of the ``--config`` files named in ``args`` (to see which datasets they need)."""
    texts = []
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path and (REPO / path).is_file():
            texts.append((REPO / path).read_text())
    return "\n".join(texts)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_TRAINER_", "EQL_RUN_ID"))}
    env.update(PL_TRAINER_FAST_DEV_RUN="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))
    root = data_root()
    if root is not None:
        env["EQL_DATA_ROOT"] = str(root)
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------------------------------
# Running: each job is a list of steps (command, exit code, output); jobs run WORKERS at a time.


@dataclass
class Step:
    argv: list[str]
    returncode: int
    output: str
    seconds: float

    def describe(self) -> str:
        return (f"$ {shlex.join(self.argv)}\n(exit {self.returncode} after {self.seconds:.0f} s)\n"
                f"{self.output[-4000:]}")


@dataclass
class JobResult:
    steps: list[Step] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None  # a README line the test could not make runnable

    def check(self) -> None:
        failed = [s for s in self.steps if s.returncode != 0]
        if self.error or failed:
            pytest.fail("\n\n".join([*(s.describe() for s in failed), *filter(None, [self.error])]), pytrace=False)
        if not self.steps and self.skipped:
            pytest.skip("; ".join(self.skipped))


def run_step(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Step:
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=cwd, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=TIMEOUT_S)
        returncode, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        returncode, output = -9, f"{exc.output or ''}\ntimed out after {TIMEOUT_S} s"
    return Step(argv, returncode, output, time.monotonic() - start)


def run_python_block(block: Block) -> JobResult:
    if data_root() is None and needs_data_root(block.code):
        return JobResult(skipped=["needs MedMNIST files other than BreastMNIST-28: set EQL_DATA_ROOT"])
    with tempfile.TemporaryDirectory(prefix="readme-python-") as tmp:
        script = Path(tmp) / f"readme_L{block.line}.py"
        script.write_text(block.code)
        return JobResult(steps=[run_step([sys.executable, script.name], Path(tmp))])


def run_yaml_block(block: Block) -> JobResult:
    with tempfile.TemporaryDirectory(prefix="readme-yaml-") as tmp:
        fragment = Path(tmp) / "fragment.yaml"
        fragment.write_text(block.code)
        argv = [sys.executable, "cli.py", "fit", "--config", "configs/quickstart.yaml", "--config", str(fragment),
                "--print_config"]
        return JobResult(steps=[run_step(argv, REPO)])


def resolve_placeholders(args: list[str], root: Path, rerun_as_fit, result: JobResult) -> list[str] | None:
    """Replace ``runs/<name>/<run>/...`` by the real path under ``root``; None (and ``result.error``) if impossible."""
    resolved = []
    for arg in args:
        prefix, value = "", arg
        if arg.startswith("--") and "=" in arg:
            prefix, value = arg.split("=", 1)
            prefix += "="
        if not PLACEHOLDER.search(value):
            resolved.append(arg)
            continue
        parts = Path(value).parts
        if not parts or parts[0] != "runs":
            result.error = (f"cannot resolve the placeholder in {arg!r}: only runs/... paths (the default run root) "
                            f"are resolved; write a real path or mark the block with a readme-test skip comment")
            return None
        pattern = str(root.joinpath(*parts[1:]))
        glob_pattern = PLACEHOLDER.sub("*", pattern)
        matches = sorted(glob.glob(glob_pattern), key=os.path.getmtime)
        if not matches:  # e.g. best.ckpt, which fast_dev_run never writes: fit the same configuration briefly
            run_name = parts[1] if len(parts) > 2 and not PLACEHOLDER.search(parts[1]) else None
            if not rerun_as_fit(run_name):
                return None
            matches = sorted(glob.glob(glob_pattern), key=os.path.getmtime)
        if not matches:
            result.error = f"{arg!r}: nothing matches {glob_pattern} even after a one-epoch fit"
            return None
        resolved.append(prefix + matches[-1])
    return resolved


def run_bash_block(block: Block) -> JobResult:
    result = JobResult()
    with tempfile.TemporaryDirectory(prefix="readme-bash-") as tmp:
        root = Path(tmp) / "runs"
        for command in shell_commands(block.code):
            args = cli_args(command)
            if args is None:
                continue
            env, _ = split_env(command)
            program = [sys.executable, "cli.py"] if command[len(env)] != "eqlightning" else [console_script()]
            if data_root() is None and needs_data_root(" ".join(command) + config_text(args)):
                result.skipped.append(f"{shlex.join(command)}: needs MedMNIST files other than BreastMNIST-28")
                continue
            at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
            subcommand = args[at] if at is not None else None

            def rerun_as_fit(run_name: str | None, args=args, at=at, env=env, program=program) -> bool:
                fit_args, i = [], 0
                while i < len(args):
                    option, value = args[i].split("=", 1) if "=" in args[i] else (args[i], None)
                    if option == "--ckpt_path":
                        i += 1 if value is not None else 2
                        continue
                    fit_args.append("fit" if i == at else args[i])
                    i += 1
                fit_args += TINY_FIT + ["--run_root", str(root)] + (["--run_name", run_name] if run_name else [])
                step = run_step(program + fit_args, REPO, env)
                result.steps.append(step)
                return step.returncode == 0

            args = resolve_placeholders(args, root, rerun_as_fit, result)
            if args is None:
                return result
            resumes = "--ckpt_path=last" in args or ("--ckpt_path", "last") in zip(args, args[1:])
            if resumes and not glob.glob(str(root / "**" / "last.ckpt"), recursive=True) and not rerun_as_fit(None):
                return result  # `--ckpt_path last` resumes a run: make one (fast_dev_run saves no checkpoint)
            if subcommand in TRAINER_SUBCOMMANDS and not any(a.startswith("--print_config") for a in args):
                args = args + FAST + ["--run_root", str(root)]
            result.steps.append(run_step(program + args, REPO, env))
            if result.steps[-1].returncode != 0:
                return result  # later lines may depend on this one
    return result


def runnable(block: Block) -> bool:
    """Whether the block has something to run (a skip comment aside)."""
    if block.lang == "python":
        return True
    if block.lang == "yaml":
        try:
            data = yaml.safe_load(block.code)
        except yaml.YAMLError:
            return False  # test_yaml_block_parses says why
        return isinstance(data, dict) and bool(CLI_KEYS & set(data))
    if block.lang == "bash":
        return any(cli_args(c) is not None for c in shell_commands(block.code))
    return False


RUNNERS = {"python": run_python_block, "yaml": run_yaml_block, "bash": run_bash_block}
COST = {"bash": 0, "python": 1, "yaml": 2}  # longest first
BLOCKS = readme_blocks()
RUNNABLE = {b.id: b for b in BLOCKS if b.lang in TESTED and runnable(b) and b.skip_reason is None}
SKIPPED = {b.id: b for b in BLOCKS if b.lang in TESTED and runnable(b) and b.skip_reason is not None}


@pytest.fixture(scope="module")
def jobs(request) -> dict[str, Future]:
    """Starts the subprocesses of every selected README test at once, ``WORKERS`` at a time."""
    selected = [item.callspec.params["block_id"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")
                and item.callspec.params.get("block_id") in RUNNABLE]
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="readme")
    blocks = sorted((RUNNABLE[i] for i in dict.fromkeys(selected)), key=lambda b: (COST[b.lang], b.line))
    futures = {b.id: pool.submit(RUNNERS[b.lang], b) for b in blocks}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _ids(lang: str) -> list[str]:
    return [b.id for b in BLOCKS if b.lang == lang and (b.id in RUNNABLE or b.id in SKIPPED)]


def _check(block_id: str, jobs: dict[str, Future]) -> None:
    if block_id in SKIPPED:
        pytest.skip(f"README.md:{SKIPPED[block_id].line}: {SKIPPED[block_id].skip_reason}")
    jobs[block_id].result().check()


# ---------------------------------------------------------------------------------------------------------------
# Quick checks (no subprocess).


def test_every_block_names_a_tested_language():
    untagged = [f"README.md:{b.line}: ```{b.lang}" for b in BLOCKS if b.lang not in LANGUAGES]
    assert not untagged, (f"code blocks need one of the language tags {LANGUAGES} ({TESTED} are run by this test, "
                          f"text is for trees and output): {untagged}")


def test_every_skip_names_a_reason():
    text = README.read_text()
    markers = MARKER.findall(text)
    attached = [b for b in BLOCKS if b.marker is not None]
    assert len(attached) == len(markers), "a readme-test comment must be the line right before a code block"
    for block in attached:
        assert block.skip_reason, (f"README.md:{block.line}: {block.marker!r}: write "
                                   f"'<!-- readme-test: skip (why it cannot run here) -->'")


def test_readme_blocks_are_found():
    langs = {b.lang for b in BLOCKS}
    assert {"python", "bash", "yaml"} <= langs and len(RUNNABLE) >= 5, "README parsing found too few blocks"
    text = "<!-- readme-test: skip (needs a GPU) -->\n```python\nimport x\n```\n\n```bash\npython cli.py fit \\\n" \
           "  --config a.yaml   # c\n```\n"
    gpu, cli = readme_blocks(text)
    assert (gpu.skip_reason, gpu.code, cli.skip_reason) == ("needs a GPU", "import x\n", None)
    assert shell_commands(cli.code) == [["python", "cli.py", "fit", "--config", "a.yaml"]]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "yaml"], ids=lambda b: b.id)
def test_yaml_block_parses(block):
    yaml.safe_load(block.code)


def _paths(command: list[str], venvs: set[str]) -> list[tuple[str, bool]]:
    """``(path, whether only its directory must exist)`` for the tokens of a command that name files."""
    found = []
    for i, token in enumerate(command):
        option = command[i - 1] if i else ""
        if "=" in token and token.startswith("-"):
            option, token = token.split("=", 1)
        if (token.startswith("-") or not PATH_LIKE.match(token) or PLACEHOLDER.search(token)
                or not ("/" in token or FILE_SUFFIX.search(token)) or ASSIGNMENT.match(token)):
            continue
        if any(token == v or token.startswith(v.rstrip("/") + "/") for v in venvs):
            continue  # inside a virtual environment the same line creates
        found.append((token, option in OUTPUT_OPTIONS))
    return found


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=lambda b: b.id)
def test_bash_block_names_existing_files_and_targets(block):
    commands = shell_commands(block.code)
    venvs = {c[c.index("venv") + 1] for c in commands if "venv" in c and c.index("venv") + 1 < len(c)}
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.MULTILINE))
    missing = []
    for command in commands:
        _, command = split_env(command)
        if command and command[0] == "make":
            missing += [f"make target {t!r}" for t in command[1:]
                        if not t.startswith("-") and not ASSIGNMENT.match(t) and t not in targets]
        for path, output in _paths(command, venvs):
            target = REPO / path
            if not (target.parent.is_dir() if output else target.exists()):
                missing.append(path)
    assert not missing, f"README.md:{block.line}: these do not exist in the repository: {missing}"


def _is_torch_install(command: list[str]) -> bool:
    """``pip install torch`` (any version or index): the user's own build, which CI replaces by the CPU wheel."""
    packages = [t for t in command[2:] if not t.startswith("-") and "://" not in t]  # not options, index URLs
    return command[:2] == ["pip", "install"] and bool(packages) and all(
        re.match(r"^torch([<>=!~]=?.*)?$", p) for p in packages)


def test_readme_install_blocks_are_what_ci_runs():
    """Every bash block with a ``pip install`` line is run line for line by .ci/run (except the torch install)."""
    ci_lines = set()
    for line in CI_SCRIPT.read_text().splitlines():
        try:
            ci_lines.add(" ".join(shlex.split(line, comments=True)))
        except ValueError:  # e.g. a line of an embedded Python script
            pass
    install_blocks = [b for b in BLOCKS if b.lang == "bash"
                      and any(c[:2] == ["pip", "install"] for c in map(lambda c: split_env(c)[1],
                                                                       shell_commands(b.code)))]
    assert install_blocks, "README.md shows no `pip install` block"
    absent = [f"README.md:{b.line}: {shlex.join(c)}" for b in install_blocks for c in shell_commands(b.code)
              if not _is_torch_install(c) and " ".join(c) not in ci_lines]
    assert not absent, f"these README install lines are not in .ci/run verbatim (CI must run them): {absent}"
    assert re.search(r"^make test\b", CI_SCRIPT.read_text(), re.MULTILINE), ".ci/run must still run `make test`"


# ---------------------------------------------------------------------------------------------------------------
# Running the blocks (subprocesses).


@pytest.mark.slow
@pytest.mark.parametrize("block_id", _ids("python"))
def test_python_block_runs(block_id, jobs):
    _check(block_id, jobs)


@pytest.mark.slow
@pytest.mark.parametrize("block_id", _ids("yaml"))
def test_yaml_fragment_is_accepted_by_the_cli(block_id, jobs):
    _check(block_id, jobs)


@pytest.mark.slow
@pytest.mark.parametrize("block_id", _ids("bash"))
def test_bash_block_cli_lines_run(block_id, jobs):
    _check(block_id, jobs)
