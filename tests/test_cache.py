"""The CLI's persistent compilation cache: where it goes, and the two ways to leave it off."""

import jax

from ddm.core import cache


def _recorded_updates(monkeypatch) -> dict:
    updates = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    return updates


def test_cache_goes_under_ddm_cache_dir(tmp_path, monkeypatch):
    updates = _recorded_updates(monkeypatch)
    monkeypatch.setenv("DDM_CACHE_DIR", str(tmp_path / "c"))
    folder = cache.enable_compilation_cache({})
    assert folder == tmp_path / "c" / "jax" and folder.is_dir()
    assert updates == {"jax_compilation_cache_dir": str(folder),
                       "jax_compilation_cache_max_size": cache.COMPILE_CACHE_MAX_BYTES}


def test_jax_setting_wins_and_off_switch_and_unwritable_folder(tmp_path, monkeypatch):
    updates = _recorded_updates(monkeypatch)
    assert cache.enable_compilation_cache({"JAX_COMPILATION_CACHE_DIR": "/x/y"}) == tmp_path.__class__("/x/y")
    for off in ("0", "off", "OFF", "false"):
        assert cache.enable_compilation_cache({"DDM_COMPILE_CACHE": off}) is None
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DDM_CACHE_DIR", str(blocker))  # a folder cannot be made under a regular file
    assert cache.enable_compilation_cache({}) is None
    assert updates == {}
