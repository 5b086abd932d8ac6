"""HTTP routes. They translate between the protocol and the engine and compute nothing:
routing maths lives in router_index/, blending in adapters/, scheduling in app/engine/."""

from app.api import admin, docs, health, openai, rest

ROUTERS = (openai.router, rest.router, admin.router, health.router, docs.router)
