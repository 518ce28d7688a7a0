"""The dashboard at /dashboard: the queues, workers, requests and failures of every service, in a browser.

Served by the API itself (no extra service), its page and assets shipped in this package (no CDN). `routes`
are its paths, `access` who may see them, `views` what they answer, `answers` the per-minute counts of the
API's answers (rejections, errors) that every API process adds to Redis in the background.
"""

from queue_service.api.dashboard.answers import AnswerCounts
from queue_service.api.dashboard.routes import routes

__all__ = ["AnswerCounts", "routes"]
