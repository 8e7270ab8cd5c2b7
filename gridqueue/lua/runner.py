"""How the ledger's scripts are called: as one function library, or as one script each.

``function`` (Redis 7 and later): the scripts are one library (:func:`gridqueue.lua.library`),
loaded once with ``FUNCTION LOAD`` and called with ``FCALL`` (``FCALL_RO`` for those that
write nothing), so the prelude is built at load, not on every call. ``eval``: each script
is its own text, called by ``EVALSHA`` (redis-py loads it on ``NOSCRIPT``), as before
Redis 7 and where an ACL refuses ``FUNCTION LOAD``. ``auto`` (the default) takes
``function`` where the server allows it, and keeps ``eval`` otherwise.

Redis keeps its functions in its RDB and AOF and sends them to its replicas, but a server
restarted empty, a ``FUNCTION FLUSH`` or a promoted replica that never had the library
answers "Function not found": the library is loaded again and the call sent once more,
as redis-py does for ``NOSCRIPT``. A call that was refused did nothing, so sending it
again is safe. In a pipeline only the refused calls are sent again (:meth:`execute`).

A script error names the script and the line of its ``.lua`` file, on both paths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from redis.exceptions import NoPermissionError, ResponseError

from gridqueue.logs import get_logger
from gridqueue.lua import Library, body_line, library, no_writes, script_source

__all__ = ["AsyncScriptRunner", "Mode", "ScriptRunner"]

Mode = Literal["auto", "function", "eval"]
Arg = str | int | float

_log = get_logger("gridqueue.lua")

_LINE = re.compile(r"@?user_(script|function):(\d+)")


def _not_found(error: BaseException) -> bool:
    return isinstance(error, ResponseError) and "Function not found" in str(error)


def _unsupported(error: BaseException) -> bool:
    """The server has no functions (before Redis 7), or its ACL does not let us use them."""
    if isinstance(error, NoPermissionError):
        return True
    return isinstance(error, ResponseError) and "unknown command" in str(error).lower()


def _already_loaded(error: BaseException) -> bool:
    return isinstance(error, ResponseError) and "already exists" in str(error)


class _Runner:
    """What the sync and asyncio runners share: the choice of path, the commands, and the
    errors; only the I/O differs."""

    def __init__(self, names: Sequence[str], mode: Mode) -> None:
        self.names = tuple(names)
        self.library: Library = library(self.names)
        self.requested: Mode = mode
        # None while auto has not asked the server yet.
        self.mode: Literal["function", "eval"] | None = None if mode == "auto" else mode
        self._loaded = False
        self._by_function = {f: name for name, f in self.library.functions.items()}
        self._verbs = {name: "FCALL_RO" if no_writes(name) else "FCALL" for name in self.names}

    def _fcall(self, name: str, args: Sequence[Arg]) -> tuple[Arg, ...]:
        return (self._verbs[name], self.library.functions[name], 0, *args)

    def _fall_back(self, why: BaseException) -> None:
        if self.requested == "function":
            raise why
        _log.info("ledger.scripts_by_eval", reason=str(why))
        self.mode = "eval"

    def _loaded_reply(self, error: BaseException | None) -> None:
        """After a FUNCTION LOAD: its error, or None."""
        if error is None or _already_loaded(error):
            self.mode, self._loaded = "function", True
        elif _unsupported(error):
            self._fall_back(error)
        else:
            raise error

    def clear(self, error: BaseException, name: str | None) -> BaseException:
        """The error of a script, with the script and the line of its file it came from."""
        if not isinstance(error, ResponseError) or name is None:
            return error
        message = str(error)
        found = _LINE.findall(message)
        if not found:
            return error
        kind, line = found[-1][0], int(found[-1][1])
        if kind == "function":
            where = self.library.where(line)
        else:
            at = body_line(name, line)
            where = f"{name}.lua line {at}" if at else f"the prelude of {name}.lua"
        return type(error)(f"ledger script {name!r} failed at {where}: {message}")

    def _name_of(self, command: tuple[Any, ...]) -> str | None:
        if len(command) > 1 and str(command[0]).upper().startswith("FCALL"):
            return self._by_function.get(str(command[1]))
        return None


class ScriptRunner(_Runner):
    """The ledger's scripts on a sync redis-py client; see the module docstring."""

    def __init__(self, client: Any, names: Sequence[str], mode: Mode = "auto") -> None:
        super().__init__(names, mode)
        self.client = client
        self._scripts: dict[str, Any] = {}  # the eval path's, registered on first use
        self._by_sha: dict[str, str] = {}

    def load(self) -> None:
        """Load the library (a no-op where it is there already), or settle on eval."""
        try:
            self.client.function_load(self.library.text)
        except ResponseError as error:
            self._loaded_reply(error)
        else:
            self._loaded_reply(None)

    def _ready(self) -> None:
        if self.mode is None or (self.mode == "function" and not self._loaded):
            self.load()

    def _script(self, name: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client.register_script(script_source(name))
            self._by_sha[script.sha] = name
        return script

    def command(self, name: str, args: Sequence[Arg]) -> tuple[Arg, ...]:
        """The raw command of one call, for a load generator that packs its commands: the
        library or the script is loaded now, and a loss of it later is not handled."""
        self._ready()
        if self.mode == "function":
            return self._fcall(name, args)
        sha = self.client.script_load(script_source(name))
        return ("EVALSHA", sha, 0, *args)

    def call(self, name: str, args: Sequence[Arg]) -> Any:
        """Call one script with its whole ARGV (the fixed arguments first)."""
        if self.mode is None:
            self.load()
        if self.mode == "function":
            try:
                return self.client.execute_command(*self._fcall(name, args))
            except ResponseError as error:
                if not (_not_found(error) or _unsupported(error)):
                    raise self.clear(error, name) from None
                self._loaded = False
                self.load()
                if self.mode == "function":
                    try:
                        return self.client.execute_command(*self._fcall(name, args))
                    except ResponseError as again:
                        raise self.clear(again, name) from None
        try:
            return self._script(name)(keys=[], args=list(args))
        except ResponseError as error:
            raise self.clear(error, name) from None

    def queue(self, pipe: Any, name: str, args: Sequence[Arg]) -> None:
        """Queue one call on ``pipe``; run it with :meth:`execute`."""
        self._ready()
        if self.mode == "function":
            pipe.execute_command(*self._fcall(name, args))
        else:
            self._script(name)(keys=[], args=list(args), client=pipe)

    def execute(self, pipe: Any, raise_on_error: bool = True) -> list[Any]:
        """``pipe.execute()``, where a call that found no library (Redis lost it since it
        was loaded) is sent again once the library is back; errors as :meth:`call`'s."""
        stack = [(args, options) for args, options in pipe.command_stack]
        replies = list(pipe.execute(raise_on_error=False))
        refused = [i for i, reply in enumerate(replies) if _not_found(reply)]
        if refused:
            self._loaded = False
            self.load()
            # The refused calls again, and a WAIT after them again, so that it covers them.
            waits = [i for i, (args, _) in enumerate(stack) if str(args[0]).upper() == "WAIT"]
            resend = sorted(set(refused) | {i for i in waits if i > refused[0]})
            again = self.client.pipeline(transaction=False)
            for i in resend:
                args, options = stack[i]
                name = self._name_of(args)
                if name is None:
                    again.execute_command(*args, **options)
                else:
                    self.queue(again, name, args[3:])
            for i, reply in zip(resend, again.execute(raise_on_error=False), strict=True):
                if i in waits and isinstance(replies[i], int) and isinstance(reply, int):
                    # The first WAIT covered the calls that were not sent again: the
                    # replicas that confirmed both are the fewer of the two counts.
                    reply = min(replies[i], reply)
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                args, _ = stack[i]
                name = self._name_of(args) or self._by_sha.get(
                    str(args[1]) if len(args) > 1 else ""
                )
                replies[i] = reply = self.clear(reply, name)
                if raise_on_error:
                    raise reply
        return replies


class AsyncScriptRunner(_Runner):
    """The same on redis-py's asyncio client (the asyncio producer's submit)."""

    def __init__(self, client: Any, names: Sequence[str], mode: Mode = "auto") -> None:
        super().__init__(names, mode)
        self.client = client
        self._scripts: dict[str, Any] = {}

    async def load(self) -> None:
        try:
            await self.client.function_load(self.library.text)
        except ResponseError as error:
            self._loaded_reply(error)
        else:
            self._loaded_reply(None)

    def _script(self, name: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client.register_script(script_source(name))
        return script

    async def call(
        self, name: str, args: Sequence[Arg], wait: tuple[int, int] | None = None
    ) -> Any:
        """One call, and with ``wait=(replicas, timeout_ms)`` a WAIT in the same round trip:
        then the reply is ``(reply, replicas that confirmed)``."""
        if self.mode is None or (self.mode == "function" and not self._loaded):
            await self.load()
        try:
            return await self._send(name, args, wait)
        except ResponseError as error:
            if self.mode != "function" or not (_not_found(error) or _unsupported(error)):
                raise self.clear(error, name) from None
        self._loaded = False
        await self.load()
        try:
            return await self._send(name, args, wait)
        except ResponseError as error:
            raise self.clear(error, name) from None

    async def _send(self, name: str, args: Sequence[Arg], wait: tuple[int, int] | None) -> Any:
        if wait is None:
            if self.mode == "function":
                return await self.client.execute_command(*self._fcall(name, args))
            return await self._script(name)(keys=[], args=list(args))
        pipe = self.client.pipeline(transaction=False)
        if self.mode == "function":
            pipe.execute_command(*self._fcall(name, args))
        else:
            await self._script(name)(keys=[], args=list(args), client=pipe)
        pipe.wait(*wait)
        reply, confirmed = await pipe.execute()
        return reply, confirmed
