"""The tiny base model shipped in the package must match the current recipe, or `make demo` pretrains (~10 min)."""

from drpost.world.pretrain import BUNDLE_DIR, base_model_path, ensure_base_model


def test_bundled_tiny_base_model_matches_the_current_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("DRPOST_CACHE", str(tmp_path))  # empty cache: only the bundle can answer
    expected = BUNDLE_DIR / base_model_path("tiny").name
    assert expected.is_dir(), (
        f"no bundled base model for the current recipe ({expected.name}); rebuild it with "
        "`python -m drpost.world.pretrain --size tiny` and copy the cache folder into src/drpost/world/assets/")
    assert ensure_base_model("tiny") == expected


def test_cache_key_ignores_the_transformers_version():
    from drpost.world.pretrain import recipe

    assert "transformers_version" not in recipe("tiny")["model"]
