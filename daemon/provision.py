"""A new home made ready to decide in one call: config, the base model committed as v0000, and the
regression suites and preserved keys pinned from it. The demo, the benchmarks and the tests all
start here, so they start from what `mendd init` makes."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from daemon.config import MenddConfig, load_config
from daemon.home import Home, init_home
from daemon.suite_files import pin_suites
from daemon.versioning import create_versions
from editors.editable import Editable
from store.models import LoadedModel, load_model


def provision_home(home: Home, model_spec: str, loaded: LoadedModel | None = None, settings: dict[str, Any] | None = None,
                   data_root: Path | None = None, suites_from: Home | None = None) -> Home:
    """Create `home` for `model_spec`; `settings` (nested like mendd.yaml) replace the defaults.

    `suites_from`: copy another home's pinned suites and keys instead of pinning again (same model
    and base weights; pinning SmolLM2's suites takes minutes)."""
    loaded = loaded or load_model(model_spec)
    init_home(home, model_spec, settings=settings)
    base = create_versions(home, loaded.model, loaded.tokenizer, model_spec)
    editor = load_config(home).editor
    routing_layer = editor.routing_layer if editor.memory == "routed" else None
    if suites_from is None:
        pin_suites(home, Editable(loaded.model, loaded.tokenizer), model_spec, base.tag, data_root, routing_layer)
    else:
        copies = [(suites_from.suites_path, home.suites_path), (suites_from.keys_path, home.keys_path)]
        if suites_from.routing_path.exists():  # else the routing reference is pinned on first use
            copies.append((suites_from.routing_path, home.routing_path))
        for source, target in copies:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return home


def provisioned(home: Home, model_spec: str) -> MenddConfig:
    """`home`'s config, the home made first if its suites are not pinned yet (a benchmark keeps its
    home between runs)."""
    if not home.suites_path.exists():
        provision_home(home, model_spec)
    return load_config(home)


def base_editable(config: MenddConfig) -> Editable:
    """The configured model, freshly loaded, with the tensors the editor edits."""
    loaded = load_model(config.model)
    return Editable(loaded.model, loaded.tokenizer, config.editor.edit_layers)
