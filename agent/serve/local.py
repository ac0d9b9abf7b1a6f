"""The agent's own client as a caller of its serving part: the same messages and checks as
a remote peer's stream, with no stream (route.hops.LocalHop talks to this)."""

from __future__ import annotations

from agent.serve.admission import RequestRejected
from agent.serve.serving import Serving
from agent.serve.sessions import LOCAL_PEER, Session
from protocol import ErrorReply, OpenSession, SessionOpened, Step, StepResult


class LocalEndpoint:
    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def open(self, msg: OpenSession) -> tuple[Session, SessionOpened] | ErrorReply:
        try:
            session = self.serving.open_session(LOCAL_PEER, msg)
        except RequestRejected as exc:
            return ErrorReply(code=exc.code, message=str(exc), step=None)
        opened = SessionOpened(
            session_id=session.id,
            max_length=session.max_length,
            kv_free_tokens=self.serving.kv_free_tokens(),
        )
        return session, opened

    async def step(self, session: Session, msg: Step) -> StepResult | ErrorReply:
        try:
            return await self.serving.run_step(session, msg)
        except RequestRejected as exc:
            return ErrorReply(code=exc.code, message=str(exc), step=msg.step)

    def close(self, session: Session) -> None:
        self.serving.close_session(session)
