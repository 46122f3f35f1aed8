import gc
import sys

gc.disable()  # the imports create ~0.5M long-lived objects: collecting while they load cost seconds
from ..errors import run_main  # noqa: E402
from .cli import main  # noqa: E402

gc.enable()
gc.freeze()  # and they live until exit: out of later full collections (and the one at exit)
sys.exit(run_main(main))
