"""Makes fedtune's own tuners known to peft, so that peft's own loaders find them.

peft resolves an adapter by the ``peft_type`` string in ``adapter_config.json``: it looks the
string up in ``PEFT_TYPE_TO_CONFIG_MAPPING`` / ``PEFT_TYPE_TO_TUNER_MAPPING``, which its public
``register_peft_method`` fills. That function only accepts names that are members of the closed
``PeftType`` enum, so :func:`register` first adds the members, then registers each tuner.

``import fedtune`` must not import torch or peft (the coordinator's engines import fedtune
without either), hence :func:`install_import_hook`: it defers :func:`register` until something
else imports peft.

This module imports neither torch nor peft at import time.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# (peft method name, module defining it, config class, tuner class). peft derives the PeftType
# member (the upper-cased name) and, by default, the parameter prefix (name + "_") from the name.
_METHODS: tuple[tuple[str, str, str, str], ...] = (
    ("bitfit", "fedtune.methods.tuners.bitfit", "BitFitConfig", "BitFitModel"),
    ("bottleneck", "fedtune.methods.tuners.bottleneck", "BottleneckConfig", "BottleneckModel"),
)

# The PeftType member names fedtune adds (== their values, as for peft's own members).
PEFT_TYPE_NAMES: tuple[str, ...] = tuple(name.upper() for name, *_ in _METHODS)

_lock = threading.RLock()
_registered = False


def add_peft_type_members(names: Sequence[str]) -> None:
    """Adds members to peft's ``PeftType`` enum, idempotently.

    Why: ``register_peft_method`` refuses a name whose upper case is not a ``PeftType`` member, and
    the enum cannot be subclassed or extended through any public API. A member is therefore built
    the way ``enum`` builds one (a ``str`` instance of the class with ``_name_``/``_value_``) and
    put in the three tables lookups use: ``_member_map_`` (``PeftType.X``, ``PeftType["X"]``,
    iteration via ``_member_names_``) and ``_value2member_map_`` (``PeftType("X")``, ``in``). Its
    value equals its name, as for peft's own members, so the member hashes and compares like the
    plain string that ``adapter_config.json`` carries.

    Args:
        names: Upper-case member names, e.g. ``["BITFIT"]``.
    """
    from peft.utils.peft_types import PeftType

    enum_cls: Any = PeftType  # enum's private tables are not in its type stubs
    for name in names:
        if name in PeftType._member_map_:
            continue
        member: Any = str.__new__(PeftType, name)
        member._name_ = name
        member._value_ = name
        member.__objclass__ = PeftType
        member._sort_order_ = len(PeftType._member_names_)
        # Class attribute first: EnumType.__setattr__ refuses to rebind names already in _member_map_.
        setattr(PeftType, name, member)
        enum_cls._member_map_[name] = member
        enum_cls._value2member_map_[name] = member
        enum_cls._member_names_.append(name)
        if isinstance(getattr(enum_cls, "_hashable_values_", None), list):  # Python >= 3.13 keeps this too
            enum_cls._hashable_values_.append(name)


def register() -> None:
    """Registers fedtune's tuners (``bitfit``, ``bottleneck``) with peft; idempotent and thread-safe.

    Imports peft (and torch). After this, ``get_peft_model``, ``PeftConfig.from_pretrained`` and
    ``PeftModel.from_pretrained`` handle these adapters like peft's own.

    Raises:
        RuntimeError: peft already has a different method under one of these names (a newer peft
            shipping its own ``bitfit``, say); fedtune does not override it.
    """
    global _registered
    if _registered:  # fast path: configs call this on every construction
        return
    with _lock:
        if _registered:
            return
        add_peft_type_members(PEFT_TYPE_NAMES)

        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        from peft.utils import PeftType, register_peft_method

        for name, module_name, config_name, model_name in _METHODS:
            module = importlib.import_module(module_name)
            config_cls, model_cls = getattr(module, config_name), getattr(module, model_name)
            existing = PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType[name.upper()])
            if existing is config_cls:
                continue
            if existing is not None:
                raise RuntimeError(
                    f"peft already registers a method {name!r} "
                    f"({existing.__module__}.{existing.__qualname__}); fedtune's {config_name} would shadow it"
                )
            register_peft_method(
                name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix
            )
        _registered = True


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps peft's real loader for one import: runs it, then :func:`register`."""

    def __init__(self, loader: importlib.abc.Loader, hook: _PeftImportHook) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back before peft's code runs, so that peft (and anything inspecting
        # peft.__loader__ / __spec__.loader later) never sees this wrapper.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)  # a failing import of peft propagates; the hook stays armed
        self._hook.remove()
        try:
            # peft's __init__ (which registers peft's own tuners) has fully run at this point.
            register()
        except Exception as exc:  # noqa: BLE001 - a fedtune bug must not make peft unimportable
            warnings.warn(
                f"fedtune could not register its peft tuners: {exc!r}", RuntimeWarning, stacklevel=2
            )

    def __getattr__(self, name: str) -> Any:
        # Anything else the import machinery may ask of a loader (is_package, get_code, ...).
        return getattr(self._loader, name)


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that only intercepts the top-level ``peft`` import."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft":
            return None
        # Ask the finders after this one, exactly as the import system would have.
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None

    def remove(self) -> None:
        """Takes this finder off ``sys.meta_path`` (no-op if already gone)."""
        global _hook
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            if _hook is self:
                _hook = None


_hook: _PeftImportHook | None = None


def install_import_hook() -> None:
    """Registers the tuners now if peft is imported, else as soon as ``import peft`` completes.

    Does not import peft or torch itself. Idempotent: calling it again leaves one hook at most.
    """
    global _hook
    peft = sys.modules.get("peft")
    if peft is not None:
        spec = getattr(peft, "__spec__", None)
        if not getattr(spec, "_initializing", False):
            register()
            return
        # peft is half-imported (this call came from inside `import peft`): registering now would
        # race peft's own tuner registrations, and the finder would never fire again. Rare enough
        # to leave to an explicit register() call.
        warnings.warn("peft is still being imported; call fedtune.methods.tuners.register() afterwards",
                      RuntimeWarning, stacklevel=2)
        return
    with _lock:
        if _hook is None:
            _hook = _PeftImportHook()
            sys.meta_path.insert(0, _hook)
