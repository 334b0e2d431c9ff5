"""The BentoML service: loads the encoder once per worker, then serves the REST API under /v1.

Run with `promptfolio serve`, or `bentoml serve service.service:PromptFolio --host 127.0.0.1`.
Configuration comes from PROMPTFOLIO_* environment variables (service/config.py).
"""

from __future__ import annotations

import logging

import bentoml

from service import connections, images
from service.api import create_app
from service.config import ServiceConfig
from service.engine import Engine

app = create_app()
log = logging.getLogger("promptfolio.service")
# header/body read timeouts and a connection cap (uvicorn has none); the worker imports this module
# before it builds its uvicorn server, so the guarded protocol is the one that server uses
connections.install()


@bentoml.service(name="promptfolio", workers=1, traffic={"timeout": 120})
@bentoml.asgi_app(app, path="/v1")
class PromptFolio:
    def __init__(self) -> None:
        cfg = ServiceConfig.from_env()
        self.engine = Engine(cfg)
        connections.configure(cfg)
        images.return_large_buffers_to_the_os()  # a large image's decode buffers do not stay resident
        app.state.engine = self.engine
        enc = self.engine.encoder
        log.warning("promptfolio ready: %s (%s) on %s, image backend %s with providers %s, fingerprint %s, "
                    "store %s, %d temporary files recovered", enc.arch, enc.source, enc.device,
                    self.engine.backend.name, self.engine.backend.providers, enc.fingerprint[:40], cfg.store,
                    self.engine.recovered_tmp_files)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.engine.batcher.close()
        self.engine.decode_pool.close()
