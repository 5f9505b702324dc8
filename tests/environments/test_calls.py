"""The safe executor: only ``name(literal, key=literal)`` runs, and every mistake is a result the model sees."""

from __future__ import annotations

import sys

import pytest

from evaluators.worlds.bfcl.calls import UnsafeCall, parse_call, render_call
from evaluators.worlds.bfcl.env import BfclEnv, get_entry


@pytest.fixture
def env() -> BfclEnv:
    return BfclEnv.fresh(get_entry("multi_turn_base_0"))  # GorillaFileSystem + TwitterAPI


def test_parse_reads_name_and_literal_arguments() -> None:
    call = parse_call("mv('a.txt', destination='temp', flags=[1, 2.5, True, None, {'k': (1, -2)}])")
    assert call.name == "mv" and call.args == ("a.txt",)
    assert call.kwargs == {"destination": "temp", "flags": [1, 2.5, True, None, {"k": (1, -2)}]}
    assert parse_call(render_call("cd", {"folder": "it's \"here\""})).kwargs == {"folder": "it's \"here\""}


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch /tmp/pwned')",  # a call on a call's result
    "os.system('ls')",  # attribute access
    "cd(folder=__import__('os').getcwd())",  # a call inside the arguments
    "cd(folder=str(1))",
    "cd(folder=[c for c in 'ab'])",  # comprehension
    "cd(folder={c: 1 for c in 'ab'})",
    "cd(folder=(lambda: 'x')())",
    "cd(folder=name)",  # a variable
    "cd(folder='abc'[0])",  # subscript
    "cd(folder='a' + 'b')",  # arithmetic on strings
    "cd(*['document'])",
    "cd(**{'folder': 'document'})",
    "(lambda: 1)()",
    "cd(folder='a'); rm(file_name='b')",
    "cd(folder='a')\nrm(file_name='b')",
    "cd",
    "",
])
def test_unsafe_calls_are_refused_before_anything_runs(env: BfclEnv, text: str) -> None:
    before = env.state()
    with pytest.raises(UnsafeCall):
        parse_call(text)
    result = env.run(text)
    assert result.error == "unsafe_call" and result.output.startswith("Error during execution: ")
    assert env.state() == before


def test_dunder_import_as_a_function_name_is_unknown(env: BfclEnv) -> None:
    sys.modules.pop("antigravity", None)
    result = env.run("__import__('antigravity')")
    assert result.error == "unknown_function" and "antigravity" not in sys.modules


def test_private_and_unknown_names_are_not_callable(env: BfclEnv) -> None:
    before = env.state()
    for text in ("_load_scenario({})", "load_scenario({})", "eval('1')", "exit()", "print('x')"):
        assert env.run(text).error == "unknown_function", text
    assert env.state() == before


def test_wrong_argument_names_and_counts_are_bad_arguments(env: BfclEnv) -> None:
    assert env.run("cd(directory='document')").error == "bad_arguments"
    assert env.run("cd()").error == "bad_arguments"
    assert env.run("cd('document', 'extra')").error == "bad_arguments"
    result = env.run("cd(folder='document', folder2='x')")
    assert result.error == "bad_arguments" and "folder2" in result.output


def test_exceptions_inside_a_method_become_execution_errors(env: BfclEnv) -> None:
    result = env.run("cd(folder=None)")  # GorillaFileSystem splits the name: AttributeError inside
    assert result.error == "execution_error" and result.output.startswith("Error during execution: ")


def test_results_are_rendered_as_bfcl_renders_them(env: BfclEnv) -> None:
    assert env.run("cd(folder='document')").output == '{"current_working_directory": "document"}'  # dict: JSON
    assert env.run("mkdir(dir_name='temp')").output == "None"  # anything else: str()
    assert env.run("cd(folder='document')").error == ""  # a failing API call is a dict with "error": no error kind
