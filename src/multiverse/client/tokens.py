"""``multiverse token``: join tokens for workers, API tokens for people and scripts."""

from __future__ import annotations

from multiverse.client import cmdline
from multiverse.client.cli import api_client, format_option, seconds_option, stderr
from multiverse.client.output import Column, render, render_one


@cmdline.group()
def token() -> None:
    """Join tokens for workers and API tokens for people and scripts."""


@token.command(name="create")
@cmdline.option("--api", is_flag=True, help="An API token instead of a join token.")
@cmdline.option(
    "--role",
    type=cmdline.Choice(["admin", "viewer"]),
    default="admin",
    show_default=True,
    help="With --api.",
)
@cmdline.option(
    "--ttl", callback=seconds_option, help="Lifetime, e.g. 1h (join tokens: default 1h)."
)
@cmdline.option(
    "--uses", type=cmdline.IntRange(1), help="Join tokens: how many workers may use it (default 1)."
)
@cmdline.option("--description", default="")
@format_option
def token_create(
    api: bool, role: str, ttl: int | None, uses: int | None, description: str, fmt: str
) -> None:
    """Create a token; prints it once (it is not stored) and its id (on stderr)."""
    if api and uses is not None:
        raise cmdline.UsageError(
            "--uses is for join tokens only: an API token is valid for every request until it "
            "expires (--ttl) or is revoked"
        )
    item = api_client().create_token(
        {
            "kind": "api" if api else "join",
            "role": role,
            "ttl_seconds": ttl,
            "uses": uses,
            "description": description,
        }
    )
    if fmt == "table":
        # The token alone on stdout, so that `$(multiverse token create)` is the token.
        cmdline.echo(item["token"])
        stderr.print(
            f"Token id: {item['id']} (`multiverse token revoke {item['id']}` revokes it)",
            highlight=False,
            markup=False,
        )
    else:
        columns = [Column("ID", lambda t: t["id"]), Column("Token", lambda t: t["token"])]
        cmdline.echo(render_one(item, columns, fmt))


TOKEN_COLUMNS = [
    Column("ID", lambda t: t["id"]),
    Column("Kind", lambda t: t["kind"]),
    Column("Role", lambda t: t["role"]),
    Column("Expires", lambda t: t["expires_at"]),
    Column("Uses Left", lambda t: t["uses_left"]),
    Column("Revoked", lambda t: "yes" if t["revoked"] else "no"),
]


@token.command(name="list")
@format_option
def token_list(fmt: str) -> None:
    """List tokens (never their secrets)."""
    cmdline.echo(render(api_client().tokens(), TOKEN_COLUMNS, fmt))


@token.command(name="revoke")
@cmdline.argument("token_or_id")
def token_revoke(token_or_id: str) -> None:
    """Revoke a token, given by its id or whole, as `token create` printed it."""
    client = api_client()
    if "." in token_or_id:  # ids are hex; every token form has a dot
        done = client.revoke_token_itself(token_or_id)
    else:
        done = client.revoke_token(token_or_id)
    cmdline.echo(f"Revoked {done['id']}")
