"""One module per adapter method; each registers itself with adapters/registry.py when imported. Every
module in this folder is imported here (so a new method is one new file here), and the adapters
package imports this package, so the registry is complete whenever plugtune.adapters is loaded."""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
