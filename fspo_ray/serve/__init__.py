"""Serving: the personalization API's bodies and the generation engines (the app is in serve/)."""
