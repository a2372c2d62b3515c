"""Text from peers as a terminal may show it.

A job's events and message carry text other machines wrote (a rank's error, a worker's log
line), and `herd jobs` / `herd watch --plain` print it to other users' terminals. An escape
sequence there clears the screen, draws fake lines or sets the window title (an outside run did
all three through a worker's report). Control characters are shown escaped; newlines and tabs
stay.
"""

from __future__ import annotations


def shown(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode()
                   for c in text)
