"""anefx.passes: one graph rewrite per module, each ``GraphModule -> PassResult``.

Importing this package imports every pass module in it; each registers itself in
``anefx.core.pass_registry`` (a new pass is a new file here plus its position, with a reason, in
``lowering/pipeline.py``).
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
