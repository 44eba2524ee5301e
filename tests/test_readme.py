"""The README and docs/ as documentation that stays true (the tests read them as one text, "the README"): the
signatures in its API table are the code's (names, order, keyword-only markers, defaults), every
`arcface_ext.<name>` it mentions exists, and its Python examples that can run on a CPU run as written."""
import argparse
import ast
import glob
import importlib
import importlib.util
import inspect
import os
import re
import sys

import pytest
import torch

import arcface_ext

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
DOCS = [README] + sorted(glob.glob(os.path.join(os.path.dirname(README), "docs", "*.md")))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def readme():
    """README.md and docs/*.md, one after the other."""
    return "\n".join(read(path) for path in DOCS)


def section(text, heading):
    """The text under a heading, up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index("\n" + heading + "\n") + len(heading) + 2
    stop = re.compile(r"^#{1,%d} " % len(level), re.M).search(text, start)
    return text[start:stop.start() if stop else len(text)]


def documented_signatures():
    """(name, parameters) for each call written in the first cell of the API table's rows."""
    found = []
    for line in section(readme(), "# API").splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split(" | ")[0]
        for code in re.findall(r"`([^`]+)`", first_cell):
            match = re.fullmatch(r"([\w.]+)\((.*)\)", code)
            if match:
                found.append((match.group(1), match.group(2)))
    return found


def resolve(name):
    target = arcface_ext
    for part in name.split("."):
        target = getattr(target, part)
    return target


def parse_parameters(text):
    """The documented parameters as ast: a `...` stands for parameters left out."""
    text = re.sub(r"\.\.\.\s*,\s*|,\s*\.\.\.(?=\s*$)", "", text.strip())
    if text == "...":
        text = ""
    return ast.parse(f"def documented({text}): pass").body[0].args


def literal(node):
    try:
        return True, ast.literal_eval(node)
    except ValueError:
        return False, None          # a symbol such as τ: the name is checked, not the value


SIGNATURES = documented_signatures()


def test_the_api_table_is_read():
    names = {name for name, _ in SIGNATURES}
    assert {"combined_margin_loss", "CombinedMarginLoss", "ArcFaceLoss", "SubCenterMarginLoss",
            "ShardedCombinedMarginLoss", "sample_classes", "set_workspace_bytes"} <= names


@pytest.mark.parametrize("name,parameters", SIGNATURES, ids=[f"{n}#{i}" for i, (n, _) in enumerate(SIGNATURES)])
def test_api_table_signature_is_the_code(name, parameters):
    actual = inspect.signature(resolve(name)).parameters
    documented = parse_parameters(parameters)
    positional = [a.arg for a in documented.args]
    keyword_only = [a.arg for a in documented.kwonlyargs]
    for arg in positional + keyword_only:
        assert arg in actual, f"README documents {name}({arg}=...), which {name} does not take: {list(actual)}"
    # A signature written out whole (no `...`, and the code takes no **kwargs the text points elsewhere for)
    # lists every parameter.
    whole = "..." not in parameters and not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in actual.values())
    left_out = [p for p in actual if p not in positional + keyword_only and not p.startswith("_")]
    assert not whole or not left_out, f"README's {name}(...) leaves out {left_out}"
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    order = [p for p in actual if actual[p].kind in kinds]
    elided = "..." in parameters      # where the `*` falls is not shown: names and defaults only
    assert elided or [p for p in order if p in positional] == positional, \
        f"README gives {name}'s positional parameters as {positional}; the code's order is {order}"
    for arg in keyword_only:
        assert actual[arg].kind == inspect.Parameter.KEYWORD_ONLY, \
            f"README shows {name}'s {arg} after `*` (keyword-only); the code takes it as {actual[arg].kind}"
    defaults = list(zip(documented.args[len(documented.args) - len(documented.defaults):], documented.defaults))
    defaults += [(a, d) for a, d in zip(documented.kwonlyargs, documented.kw_defaults)]
    for arg, node in defaults:
        if node is None:
            assert actual[arg.arg].default is inspect.Parameter.empty, \
                f"README shows {name}'s {arg.arg} without a default; the code's is {actual[arg.arg].default!r}"
            continue
        known, value = literal(node)
        if known:
            assert actual[arg.arg].default == value and type(actual[arg.arg].default) in (type(value), int, float), \
                f"README gives {name}'s {arg.arg} the default {value!r}; the code's is {actual[arg.arg].default!r}"
    for arg in documented.args[:len(documented.args) - len(documented.defaults)]:
        assert actual[arg.arg].default is inspect.Parameter.empty, \
            f"README shows {name}'s {arg.arg} without a default; the code's is {actual[arg.arg].default!r}"


def test_every_name_the_readme_gives_exists():
    text = readme()
    names = set(re.findall(r"\barcface_ext\.((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)", text))
    names |= {f"reference.{n}" for n in re.findall(r"`reference\.(?!py`)(\w+)", text)}
    names |= {f"chunked.{n}" for n in re.findall(r"`chunked\.(?!py`)(\w+)", text)}
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except AttributeError:
            missing.append(name)
    assert not missing, f"README names {missing}, which arcface_ext does not have"
    assert {"combined_margin_loss", "reference.combined_margin_loss", "chunked.shard_forward"} <= names


def python_examples():
    return re.findall(r"```python\n(.*?)```", readme(), re.S)


class TinyBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 512)

    def forward(self, images):
        return self.fc(images.flatten(1))


def test_the_examples_run_on_a_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (the checkpoint example writes its file)
    if not arcface_ext.extension_available():
        pytest.skip("the extension is not built")
    examples = python_examples()
    assert len(examples) >= 4
    ran = 0
    torch.manual_seed(0)
    for code in examples:
        if ".cuda()" in code or "init_process_group" in code:
            continue        # a GPU or a process group: the distributed tests run these calls
        # One namespace an example, holding what the text around it says the reader has (the earlier
        # examples' imports among it).
        images = torch.randn(8, 3, 8, 8)
        labels = torch.randint(0, 85742, (8,))
        namespace = {"torch": torch, "arcface_ext": arcface_ext, "backbone": TinyBackbone(),
                     "loader": [(images, labels)] * 2,
                     "embeddings": torch.randn(8, 512, requires_grad=True), "weight": torch.randn(85742, 512),
                     "labels": labels}
        if "full_state_dict" in code:  # a model holding a sharded loss (one process: every class), one step taken
            model = torch.nn.ModuleDict({"backbone": TinyBackbone(),
                                         "criterion": arcface_ext.ShardedCombinedMarginLoss(20, 512)})
            optimizer = arcface_ext.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            model["criterion"](model["backbone"](images), labels % 20).backward()
            optimizer.step()
            namespace.update(model=model, optimizer=optimizer)
            momentum = optimizer.state[model["criterion"].weight]["momentum_buffer"].clone()
        exec(compile(code, README + " (a python example)", "exec"), namespace)
        ran += 1
        if "full_state_dict" in code:
            assert torch.equal(namespace["saved"]["model"]["criterion.weight"], model["criterion"].weight)
            assert torch.equal(optimizer.state[model["criterion"].weight]["momentum_buffer"], momentum)
        if "optimizer.step()" in code:
            assert torch.isfinite(namespace["loss"]) and namespace["loss"] > 0
            assert namespace["criterion"].weight.shape == (85742, 512)
        if "return_target_cosine=True" in code:
            assert namespace["target_cosine"].shape == (8,)
            expected = arcface_ext.reference.combined_margin_loss(
                namespace["embeddings"].double(), namespace["weight"].double(), labels, s=64.0, m1=1.0, m2=0.5, m3=0.0)
            torch.testing.assert_close(namespace["loss"].double(), expected, rtol=1e-5, atol=1e-5)
    assert ran >= 2


def test_the_trainers_options_table_is_the_parser():
    """Every flag of the README's options table is one the trainer takes, and every option the trainer
    takes is in the table (under one of its spellings), so that the table neither promises nor hides."""
    config = pytest.importorskip("train.config")
    parser = config.build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    rows = [line for line in section(readme(), "## Options").splitlines() if line.startswith("| `--")]
    assert len(rows) > 40
    documented = set()
    for row in rows:
        first_cell = row.split(" | ")[0]
        documented |= set(re.findall(r"`(--[a-z][\w-]*)", first_cell))
    unknown = sorted(documented - known)
    assert not unknown, f"README's options table gives {unknown}, which python -m train does not take"
    hidden = [action.option_strings for action in parser._actions
              if action.option_strings and action.help != argparse.SUPPRESS and "-h" not in action.option_strings
              and not documented & set(action.option_strings) and not documented_elsewhere(action)]
    assert not hidden, f"python -m train takes {hidden}, which README's options table does not give"


def documented_elsewhere(action):
    """An option the table leaves to the README's text around it: named in backticks anywhere."""
    return any(f"`{flag}" in readme() for flag in action.option_strings)


# The README's shell commands: what a reader types. Each `python -m <module>` / `python <script>` it gives
# names a module or script that exists and only options its parser takes (with a choice among the
# parser's choices), and every file of the repository it names exists.

def code_spans_and_blocks():
    text = readme()
    blocks = re.findall(r"```\w*\n(.*?)```", text, re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]
    return blocks, spans


def readme_commands():
    """(target, words after it, the command) for each command line: a line of a bash block, or code in the
    text that starts with `python`, `torchrun` or a `train.<tool>` module followed by an option. The target is
    a module (`train.embed`) or a script's path (`benchmarks/bench_loss.py`)."""
    blocks, spans = code_spans_and_blocks()
    lines = [line for block in blocks for line in block.splitlines()]
    lines += [span for span in spans if re.match(r"(python|torchrun)\b|train\.[\w.]+ --", span)]
    commands = []
    for line in lines:
        for command in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
            match = (re.search(r"(?:^|\s)-m (train[\w.]*)(?=\s|$)", command)
                     or re.search(r"(?:^|\s)python (\S+\.py)(?=\s|$)", command)
                     or re.match(r"(train\.[\w.]+)(?=\s)", command))
            if match:
                commands.append((match.group(1), command[match.end():].split(), command))
    return commands


COMMANDS = readme_commands()


class _ParserBuilt(BaseException):
    """Raised by a command's parser as it starts to parse: the command then stops before doing anything."""


def command_parsers(target, monkeypatch):
    """The argparse parsers of a README command: the trainer's, or the one its main() builds, caught as it
    parses `--help` (a BaseException, so that no `except Exception` in main() takes it)."""
    if target == "train":
        return [pytest.importorskip("train.config").build_parser()]
    if target.endswith(".py"):
        path = os.path.join(os.path.dirname(README), target)
        assert os.path.isfile(path), f"README runs {target}, which does not exist"
        spec = importlib.util.spec_from_file_location("readme_command_" + re.sub(r"\W", "_", target), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        assert importlib.util.find_spec(target) is not None, f"README runs python -m {target}, which does not exist"
        module = importlib.import_module(target)

    def caught(self, *args, **kwargs):
        raise _ParserBuilt(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    try:
        module.main(*(["--help"] if inspect.signature(module.main).parameters else []))
    except _ParserBuilt as built:
        parsers = [built.args[0]]
    else:
        pytest.fail(f"{target}'s main() parsed no options")
    finally:
        monkeypatch.undo()
    if target == "train.tools.preview":   # it passes every other option to the trainer's parser
        parsers += command_parsers("train", monkeypatch)
    return parsers


def test_the_commands_are_read():
    targets = {target for target, _, _ in COMMANDS}
    assert {"train", "train.export", "train.embed", "train.verify", "train.tools.align", "train.tools.detect",
            "train.tools.clean", "train.tools.preview", "train.plots", "benchmarks/bench_loss.py"} <= targets
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("target", sorted({t for t, _, _ in COMMANDS}))
def test_every_command_takes_the_options_the_readme_gives(target, monkeypatch):
    actions = {}
    for parser in command_parsers(target, monkeypatch):
        actions.update({flag: action for action in parser._actions for flag in action.option_strings})
    wrong = []
    for _, words, command in (c for c in COMMANDS if c[0] == target):
        for i, word in enumerate(words):
            flag = word.split("=", 1)[0]
            if not re.fullmatch(r"--[A-Za-z][\w-]*", flag):
                continue
            if flag not in actions:
                wrong.append(f"{flag} (not an option of {target}) in: {command}")
                continue
            value = word.split("=", 1)[1] if "=" in word else (words[i + 1] if i + 1 < len(words) else None)
            choices, convert = actions[flag].choices, actions[flag].type
            placeholder = value is None or value.startswith(("-", "<")) or re.fullmatch(r"\.\.\.|[A-Z][A-Z_.]*", value)
            if (choices is not None and actions[flag].nargs != 0 and not placeholder
                    and (convert(value) if callable(convert) else value) not in choices):
                wrong.append(f"{flag} {value} (its choices: {sorted(map(str, choices))}) in: {command}")
    assert not wrong, "README gives:\n" + "\n".join(wrong)


def test_the_files_the_readme_names_exist():
    """Each path of the repository in the README's code (a config, a script, a result file) is there: as
    written, or, for a result file's bare name, in benchmarks/results/."""
    root = os.path.dirname(README)
    blocks, spans = code_spans_and_blocks()
    code = "\n".join(blocks + spans)
    paths = set(re.findall(r"(?<![\w./-])((?:benchmarks|train|tests|csrc|\.ci)/[\w./*-]*)", code))
    paths |= {"benchmarks/results/" + name for name in re.findall(r"(?<![\w/-])((?:amd|intel|nvidia)-[\w.*-]+)", code)}
    missing = [path for path in sorted(paths) if not glob.glob(os.path.join(root, path.rstrip(".")))]
    assert not missing, f"README names {missing}, which the repository does not hold"
    assert len(paths) > 30


def test_the_benchmark_impls_the_readme_runs_exist():
    path = os.path.join(os.path.dirname(README), "benchmarks", "bench_loss.py")
    spec = importlib.util.spec_from_file_location("readme_bench_loss", path)
    bench_loss = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_loss)
    named = {impl for target, words, _ in COMMANDS if target == "benchmarks/bench_loss.py"
             for flag, value in zip(words, words[1:]) if flag == "--impls" for impl in value.split(",")}
    assert "ours-sampled" in named
    unknown = sorted(named - set(bench_loss.IMPLS))
    assert not unknown, f"README runs bench_loss.py --impls {unknown}, which it does not have"


def test_the_trainers_options_table_gives_the_parsers_defaults():
    """A default the options table writes as one value a flag (a number, a `name`, off) is the parser's."""
    config = pytest.importorskip("train.config")
    actions = {flag: action for action in config.build_parser()._actions for flag in action.option_strings}
    checked = 0
    for row in (line for line in section(readme(), "## Options").splitlines() if line.startswith("| `--")):
        first_cell, default = [cell.strip() for cell in row.strip().strip("|").split(" | ")[:2]]
        names = [re.findall(r"`(--[\w-]+)", name) for name in first_cell.split("`, `")]   # each flag, its aliases
        values = [value.strip() for value in default.split(",")]
        if len(values) == 1:
            values *= len(names)
        if not default or len(values) != len(names):
            continue
        for aliases, value in zip(names, values):
            if value == "off":
                expected = [False]
            elif re.fullmatch(r"`[\w-]+`", value):
                expected = [value.strip("`")]
            elif re.fullmatch(r"[\d.e-]+", value):
                expected = [float(value)]
            else:
                continue        # a default that depends (`112 (64 for synthetic)`): the text says how
            for flag in aliases:
                actual = actions[flag].default
                assert actual in expected or (actions[flag].nargs == 0 and actual is None and expected == [False]), \
                    f"README's options table gives {flag} the default {value}; python -m train's is {actual!r}"
                checked += 1
    assert checked > 40


def test_every_option_the_readme_writes_is_one_of_its_commands(monkeypatch):
    """An option in the text (`--skip-existing`, `--resume`), not only in a command line, is taken by one of
    the commands the README runs: none is renamed or gone. pip's, torchrun's and mypy's own are listed here;
    pytest's own of this suite (--runslow) are read from tests/conftest.py."""
    known = {"--no-build-isolation", "--config-settings", "--nproc_per_node", "--nnodes", "--node_rank",
             "--rdzv_endpoint", "--shutdown-timeout", "--strict",
             "--shm-size", "--ulimit", "--ipc"}  # (docker run's, in trainer.md's several machines)
    with open(os.path.join(os.path.dirname(__file__), "conftest.py")) as f:
        known |= set(re.findall(r"addoption\(\"(--[\w-]+)\"", f.read()))
    for target in sorted({target for target, _, _ in COMMANDS}):
        for parser in command_parsers(target, monkeypatch):
            known |= {flag for action in parser._actions for flag in action.option_strings}
    unknown = sorted(set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", readme())) - known)
    assert not unknown, f"README writes {unknown}, which none of its commands takes"


def test_every_trainer_module_and_function_the_readme_names_exists():
    """`train.embed`, `train.tools.pack_rec`, `train.models.multiply_adds`, ...: a module of the trainer, or a
    name in one (`train.rec` / `train.idx` are RecordIO files, not code)."""
    _, spans = code_spans_and_blocks()
    names = {match.group(1) for span in spans for match in [re.match(r"(train(?:\.\w+)+)(?:\(\))?(?=\s|$)", span)]
             if match and match.group(1) not in ("train.rec", "train.idx")}
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        cut = len(parts)
        while cut > 1 and importlib.util.find_spec(".".join(parts[:cut])) is None:
            cut -= 1        # the longest importable module, then attributes of it
        target = importlib.import_module(".".join(parts[:cut]))
        for part in parts[cut:]:
            target = getattr(target, part, None)
        if target is None:
            missing.append(name)
    assert not missing, f"README names {missing}, which the trainer does not have"
    assert {"train.embed", "train.tools.pack_rec", "train.models.multiply_adds"} <= names


def anchors(text):
    """The GitHub anchors of a page's headings (lower case, punctuation but `-` and `_` dropped, spaces as `-`)."""
    headings = re.findall(r"(?m)^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.S))
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_link_within_the_readme_has_its_heading():
    """`[...](#anchor)`, `[...](docs/api.md#anchor)`, `[...](install.md)`: a page of the repository, and in it a
    heading whose anchor it is, so that a renamed or moved section leaves no dead link."""
    assert len(DOCS) > 5
    dead, count = [], 0
    for path in DOCS:
        text = re.sub(r"```.*?```", "", read(path), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", link):
                continue
            count += 1
            page, _, anchor = link.partition("#")
            target = os.path.normpath(os.path.join(os.path.dirname(path), page)) if page else path
            if not os.path.exists(target):
                dead.append(f"{os.path.relpath(path, os.path.dirname(README))}: {link} (no such file)")
            elif anchor and anchor not in anchors(read(target)):
                dead.append(f"{os.path.relpath(path, os.path.dirname(README))}: {link} (no such heading)")
    assert count > 50
    assert not dead, "dead links: " + "; ".join(dead)


def test_every_tool_of_the_trainer_is_in_the_readme():
    """Each `python -m train.<module>` a reader can run (a module that runs as __main__) is one the README
    names, so that no tool is there without a word on it."""
    root = os.path.dirname(README)
    text = readme()
    tools = []
    for path in (glob.glob(os.path.join(root, "train", "*.py"))
                 + glob.glob(os.path.join(root, "train", "tools", "*.py"))):
        with open(path, encoding="utf-8") as f:
            if 'if __name__ == "__main__"' in f.read():
                tools.append(os.path.relpath(path, root)[:-3].replace(os.sep, "."))
    assert "train.tools.align" in tools and "train.verify" in tools
    unnamed = sorted(tool for tool in tools if not re.search(r"`(?:python -m )?%s\b" % re.escape(tool), text))
    assert not unnamed, f"README says nothing of {unnamed}"
