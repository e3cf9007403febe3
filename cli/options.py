"""Option parsers shared by several commands."""

import click


def components_option(valid: tuple[str, ...]):
    """A click callback parsing ``a,b,c`` into a tuple of names from ``valid`` (None stays None)."""

    def parse(ctx, param, value: str | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        names = tuple(n.strip() for n in value.split(",") if n.strip())
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise click.BadParameter(
                f"unknown component(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        return names

    return parse
