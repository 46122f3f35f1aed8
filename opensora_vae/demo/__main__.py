import gc
import sys

gc.disable()  # the imports create ~0.5M long-lived objects: collecting while they load cost seconds
from .cli import main  # noqa: E402

gc.enable()
gc.freeze()  # and they live until exit: out of later full collections (and the one at exit)
sys.exit(main())
