"""A person labels pairs in the terminal: the prompt, response A and response B, then a/b/tie/skip/quit.

Each answer goes into the `LabelStore` (fsynced) before the next pair is shown, so quitting, a closed pipe, Ctrl-C or
a crash loses nothing, and the next session starts at the first pair still unlabelled. A skipped pair stays
unlabelled and comes back in a later session. Model output is printed as plain `Text`, never as rich markup: a
response containing "[bold]" or "[/x]" is shown as written instead of being styled or raising a MarkupError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

from rich.console import Console, Group
from rich.panel import Panel
from rich.rule import Rule
from rich.text import Text

from pipeline.log import console as default_console
from reward.pairs import Label, LabelStore, Pair

QUESTION = "A / B / tie / skip / quit? "
HINT = "type a, b, tie (t), skip (s) or quit (q)"
# Every accepted answer, after lower-casing and removing whitespace, to what it does.
ANSWERS = {"a": "a", "b": "b", "t": "tie", "tie": "tie", "s": "skip", "skip": "skip", "q": "quit", "quit": "quit"}


@dataclass(frozen=True)
class Session:
    labelled: int  # labels given in this session
    skipped: int  # pairs skipped in this session (still unlabelled)
    remaining: int  # pairs of `pairs` without a label when the session ended, skipped ones included
    quit: bool  # the person quit (or input ended) before every pair had been shown


def show_pair(console: Console, pair: Pair, header: str) -> None:
    console.print(Rule(header, style="cyan"))
    turns = [Text.assemble((f"{message['role']}: ", "bold"), message["content"]) for message in pair.prompt]
    console.print(Panel(Group(*turns), title="Prompt", title_align="left", border_style="dim"))
    for name, response, style in (("A", pair.response_a, "green"), ("B", pair.response_b, "magenta")):
        console.print(Panel(Text(response), title=f"Response {name}", title_align="left", border_style=style))


def ask(read: Callable[[str], str], console: Console) -> str:
    """One of a, b, tie, skip, quit; re-asks until the answer is one of them. EOF (a closed pipe) is quit."""
    while True:
        try:
            answer = read(QUESTION)
        except EOFError:
            console.print()  # input() leaves the cursor after the question
            return "quit"
        choice = ANSWERS.get("".join(answer.split()).lower())
        if choice:
            return choice
        console.print(Text(f"{answer.strip()!r} is not an answer: {HINT}", style="yellow"))


def label_interactively(pairs: list[Pair], store: LabelStore, judge_name: str = "human",
                        read: Callable[[str], str] = input, console: Console | None = None,
                        settled: Collection[str] = ()) -> Session:
    """Ask a person about every pair of `pairs` not yet in `store`, in order; each label is stored as it is given.
    `settled`: ids of pairs not to ask about either (decided by other people's votes on the web page, or voted on
    there by this person)."""
    console = console or default_console
    labelled = skipped = 0
    stopped = False
    todo = [(number, pair) for number, pair in enumerate(pairs, 1)
            if not store.is_labelled(pair.id) and pair.id not in settled]
    remaining = len(todo)
    try:
        for number, pair in todo:
            done = len(pairs) - remaining
            show_pair(console, pair, f"pair {number} of {len(pairs)} · {done} labelled · {remaining} to go")
            choice = ask(read, console)
            if choice == "quit":
                stopped = True
                break
            if choice == "skip":
                skipped += 1
                continue
            store.add(Label(pair.id, choice, judge_name))
            labelled += 1
            remaining -= 1
    except KeyboardInterrupt:
        console.print()
        console.print(Text.assemble(("interrupted", "yellow"), f": the {labelled} labels given in this session are "
                                    f"saved in {store.path}; labelling again starts at the first pair still unlabelled"))
        raise
    console.print(f"{labelled} labelled, {skipped} skipped in this session; "
                  f"{remaining} of {len(pairs)} pairs still unlabelled", highlight=False)
    return Session(labelled, skipped, remaining, stopped)
