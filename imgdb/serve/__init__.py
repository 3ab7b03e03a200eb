"""`imgdb serve`: warm queries behind a web page (FastAPI + uvicorn), explanation maps as overlays.

`engine.Engine` holds the store (read as a reader, reloaded when it changes), the networks, models
and indexes; `batcher.MicroBatcher` groups concurrent new-image queries into one forward;
`app.create_app` is the ASGI app and `app.serve` runs it. Needs the `serve` extra
(`pip install 'imgdb[serve]'`).
"""
