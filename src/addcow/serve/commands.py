"""The commands of the control socket, by name: the words ``addcow control`` may
send and the requests :mod:`addcow.serve.control` answers (that module's note
gives their arguments and replies). Kept apart so that the command line knows
them without importing the server."""

COMMANDS = (
    "query",
    "stream-start",
    "stream-cancel",
    "stream-pause",
    "stream-resume",
    "stream-set-rate",
    "detach",
    "flush",
    "handoff",
)
