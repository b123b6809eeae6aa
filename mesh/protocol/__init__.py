"""Sans-IO protocol: message model, codec, errors and command states. No sockets, no clock."""

from .codec import *  # noqa: F403
from .codec import __all__ as _codec_all
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .message import *  # noqa: F403
from .message import __all__ as _message_all
from .schema import *  # noqa: F403
from .schema import __all__ as _schema_all
from .states import *  # noqa: F403
from .states import __all__ as _states_all

__all__ = [*_codec_all, *_errors_all, *_message_all, *_schema_all, *_states_all]
