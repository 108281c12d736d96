"""Start a page's kernel (the app's kernel spec runs ``python -m scorecam_explorer.serving.kernel``).

It is ``ipykernel_launcher`` with one difference, also applied to the Voila server: the
optional package ``rfc3987_syntax`` is marked unavailable before anything imports
``jsonschema``. When that package is installed, ``jsonschema`` imports it to check the
``iri`` string format, and importing it compiles a grammar: about 4 s of CPU per process on
a 2-core machine, paid by every page's kernel (Plotly imports ``nbformat``, which imports
``jsonschema``). Nothing the app does validates IRIs; without the package ``jsonschema``
simply skips that one format.
"""

from __future__ import annotations

import sys

SLOW_OPTIONAL_MODULES = ("rfc3987_syntax",)


def skip_slow_optional_imports() -> None:
    """Mark :data:`SLOW_OPTIONAL_MODULES` unavailable (``import`` raises ImportError)."""
    for name in SLOW_OPTIONAL_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main() -> None:
    """Run an IPython kernel, as ``python -m ipykernel_launcher -f CONNECTION_FILE`` does."""
    skip_slow_optional_imports()
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    if sys.path and sys.path[0] == "":
        del sys.path[0]  # as ipykernel_launcher: the working directory shadows nothing
    main()
