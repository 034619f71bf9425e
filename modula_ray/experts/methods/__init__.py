"""One file per method; importing a file registers it in ``METHODS``. Adding a method is one file
plus one line here."""
from . import lora  # noqa: F401
from . import modula_flan  # noqa: F401
from . import modula_res  # noqa: F401
from . import molora  # noqa: F401
from . import mode  # noqa: F401
