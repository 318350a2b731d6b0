"""Serving's parts below the app (which is serve/): the API's bodies (api, chat: OpenAI's), the request
router, users' stored histories (store: SQLite or PostgreSQL) and the playground page (static/)."""
