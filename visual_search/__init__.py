"""The ``visual-search`` command (``visual_search.cli``) and a small HTTP client of the app
(``visual_search.client``). The jobs themselves live in ``pipelines/``, ``index/`` and
``serve/``; this package only dispatches to their entry points."""
