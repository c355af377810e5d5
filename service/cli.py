"""`alora-serve`: parse Settings (flags + ALORA_* env), then serve with uvicorn and drain on SIGTERM.

SIGTERM/SIGINT -> /ready turns 503 at once; the listener stays open and requests keep being served
               -> once no request is in flight (or --drain-timeout-s passed) uvicorn shuts down
               -> exit 0.            A second signal skips the wait.
"""

import logging
import signal
import sys
import time
from types import FrameType

import uvicorn
from transformers.utils import logging as hf_logging

from alora_core import threads
from service.app import QuietRefusal, create_app
from service.metrics import Metrics
from service.middleware import Drain
from service.settings import Settings, parse_settings

log = logging.getLogger("service")

STARTUP_FAILURE = 3  # uvicorn's own exit status for a failed startup


class DrainingServer(uvicorn.Server):
    """uvicorn, but a signal first drains: readiness off, wait for in-flight requests, then exit 0."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, metrics: Metrics, drain_timeout_s: float
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.metrics = metrics
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # unlike uvicorn's own handler, the signal is not re-raised after shutdown: we exit with 0
        if self.drain.draining:
            log.warning("second %s: exiting without waiting for in-flight requests", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self.drain.start()
        self.metrics.draining.set(1)
        log.info(
            "%s: draining (ready -> 503); %d request(s) in flight, waiting up to %.0f s",
            signal.Signals(sig).name,
            self.drain.in_flight,
            self.drain_timeout_s,
        )

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            waited = time.monotonic() - self.drain.since
            if self.drain.in_flight == 0:
                log.info("drained: no request in flight, shutting down")
                self.should_exit = True
            elif waited > self.drain_timeout_s:
                log.warning(
                    "drain timeout: %d request(s) still in flight, shutting down", self.drain.in_flight
                )
                self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        QuietRefusal(app),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.drain, app.state.metrics, settings.drain_timeout_s)
    server.run()
    if not server.started:  # the lifespan failed (bad model or adapter path...): already logged
        sys.exit(STARTUP_FAILURE)


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    hf_logging.disable_progress_bar()  # one line per event in the log, not tqdm bars
    threads.configure(settings.cpu_threads or None, settings.cpu_bind)  # before any torch work
    serve(settings)


if __name__ == "__main__":
    main()
