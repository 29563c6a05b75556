"""Errors a user can fix: the CLI prints their message on one line and exits with their code."""


class UserError(Exception):
    exit_code = 1


class SpecError(UserError):
    """A spec (or an override) that does not validate; carries every problem found, each with its key path."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class QueryRefused(UserError):
    """The runtime refused one query's input (e.g. its prompt is longer than the model's context): that
    query fails, and the pipeline stays usable for the next one."""
