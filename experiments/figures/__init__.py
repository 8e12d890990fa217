"""The theory figures of theory.md section 5: one module per figure, each ``make(out, runs)``.

Every ``make`` runs (or resumes) its default sweep config from ``experiments/configs/``, plots it
into ``out/theory_<name>.{png,pdf}`` and returns a :class:`~experiments.figures._style.FigureResult`
holding the exact arrays it plotted (so tests can compare them with the sweep).
"""
