"""How a run reports progress: the library default logs; the CLI passes tqdm-backed hooks."""
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ['Progress']

_logger = logging.getLogger(__name__)


class Progress:
    """Progress hooks; the CLI passes tqdm-backed ones, the library default only logs messages."""

    def bar(self, iterable: Iterable | None = None, desc: str = '', total: int | None = None) -> Any:
        """A progress bar over ``iterable`` (or a manual counter of ``total`` steps); returns the iterable."""
        return iterable

    def update(self, bar: Any, values: dict[str, Any], advance: bool = False) -> None:
        """Show ``values`` on ``bar``; ``advance`` moves a manual counter one step."""

    def close(self, bar: Any) -> None:
        pass

    def message(self, text: str) -> None:
        _logger.info(text)
