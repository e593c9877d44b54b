"""Prometheus metrics of coins and gifts (process-wide, like every other collector of the house)."""

from __future__ import annotations

from prometheus_client import Counter

RECHARGES = Counter("livesrv_recharges_total", "Recharge orders by resulting status", ["status"])
RECHARGED_COINS = Counter("livesrv_recharged_coins_total", "Coins credited by confirmed recharges")
WEBHOOKS_REJECTED = Counter("livesrv_payment_webhooks_rejected_total",
                            "Payment webhooks refused, by reason", ["reason"])
WEBHOOKS_ACCEPTED = Counter("livesrv_payment_webhooks_accepted_total",
                            "Payment webhooks accepted (retries of handled events included)")
GIFTS = Counter("livesrv_gifts_total", "Gifts sent (each counts `count` gifts)")
GIFT_COINS = Counter("livesrv_gift_coins_total", "Coins spent on gifts")
GIFTS_REFUSED = Counter("livesrv_gifts_refused_total", "Gift requests refused, by reason", ["reason"])
