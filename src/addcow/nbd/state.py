"""The states of an NBD connection (server side) and the table of moves between them.

:class:`~addcow.nbd.connection.ServerConnection` changes state only by looking
a :class:`Trigger` up in :data:`TRANSITIONS`; a trigger the table does not
list for the current state is a bug in the server, raised as
:class:`~addcow.nbd.events.LocalProtocolError`. A peer cannot cause one:
each state parses only the messages that the table lists for it, and anything
else the peer sends there is an error reply or a :data:`Trigger.PEER_ERROR`.

Transitions (quotes from proto.md)
    ::

        state          trigger                              next state
        -------------  -----------------------------------  ------------
        GREETING       GREETING      initiate() was sent    CLIENT_FLAGS
        CLIENT_FLAGS   CLIENT_FLAGS  4 bytes, known bits    OPTIONS
        OPTIONS        EXPORT_NAME   an export was found    TRANSMISSION
        OPTIONS        GO            NBD_REP_ACK was sent   TRANSMISSION
        OPTIONS        ABORT         NBD_REP_ACK was sent   DONE
        OPTIONS        STARTTLS      NBD_REP_ACK was sent   TLS_HANDSHAKE
        TLS_HANDSHAKE  TLS_STARTED   the server's handshake OPTIONS
                                     is done
        TRANSMISSION   DISC          NBD_CMD_DISC           DONE
        CLIENT_FLAGS,
        OPTIONS,
        TLS_HANDSHAKE,
        TRANSMISSION   PEER_ERROR    the peer broke a MUST  DONE
                       CLOSED        end of the peer's data DONE
        DONE           (none)

    EXPORT_NAME: "Transmission mode can be entered (by the client sending
    NBD_OPT_EXPORT_NAME)"; GO enters it too, with its NBD_REP_ACK queued.
    ABORT: "The client can send (and the server can reply to) an
    NBD_OPT_ABORT". DISC: "The server MUST handle all outstanding requests
    ... and close the TCP session".
    PEER_ERROR: "If either the client or the server detects a violation of a
    mandatory condition ('MUST' etc.) by the other party, it MAY initiate a
    hard disconnect." Nothing is read in DONE.
    STARTTLS: "After an NBD_REP_ACK reply has been sent, the server MUST be
    prepared for a TLS handshake, and all further data MUST be sent and
    received over TLS"; in TLS_HANDSHAKE the protocol reads nothing (the TLS
    layer has the socket), and once the server reports the handshake done,
    negotiation starts again: "the server MUST NOT preserve any negotiation
    state".
"""

from __future__ import annotations

import enum
from typing import Final


class State(enum.Enum):
    """Where a connection is; the values read well in messages."""

    GREETING = "greeting"  # nothing sent yet
    CLIENT_FLAGS = "client flags"  # greeting sent, waiting for the 32 client flags
    OPTIONS = "options"  # option haggling
    TLS_HANDSHAKE = "TLS handshake"  # STARTTLS acknowledged, the TLS layer has the socket
    TRANSMISSION = "transmission"  # requests and replies
    DONE = "done"  # nothing more is read


class Trigger(enum.Enum):
    """What moves a connection from one state to another."""

    GREETING = "initiate()"
    CLIENT_FLAGS = "the client flags"
    EXPORT_NAME = "NBD_OPT_EXPORT_NAME"
    GO = "NBD_OPT_GO"
    ABORT = "NBD_OPT_ABORT"
    STARTTLS = "NBD_OPT_STARTTLS"
    TLS_STARTED = "the end of the TLS handshake"
    DISC = "NBD_CMD_DISC"
    PEER_ERROR = "a protocol violation by the peer"
    CLOSED = "the end of the peer's data"


# The peer may break the protocol or close its end in any state that reads from it.
_ENDINGS: Final = {Trigger.PEER_ERROR: State.DONE, Trigger.CLOSED: State.DONE}

TRANSITIONS: Final[dict[State, dict[Trigger, State]]] = {
    State.GREETING: {Trigger.GREETING: State.CLIENT_FLAGS},
    State.CLIENT_FLAGS: {Trigger.CLIENT_FLAGS: State.OPTIONS, **_ENDINGS},
    State.OPTIONS: {
        Trigger.EXPORT_NAME: State.TRANSMISSION,
        Trigger.GO: State.TRANSMISSION,
        Trigger.ABORT: State.DONE,
        Trigger.STARTTLS: State.TLS_HANDSHAKE,
        **_ENDINGS,
    },
    State.TLS_HANDSHAKE: {Trigger.TLS_STARTED: State.OPTIONS, **_ENDINGS},
    State.TRANSMISSION: {Trigger.DISC: State.DONE, **_ENDINGS},
    State.DONE: {},
}
"""For each state, the triggers it accepts and the state each one leads to."""
