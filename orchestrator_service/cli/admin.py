"""`projects`, `sites` and `users`."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path

import click

from orchestrator_service import token_file
from orchestrator_service.cli.app import cli
from orchestrator_service.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CliError,
    Connection,
    as_json,
    connection_options,
    interactive,
    json_option,
    utc,
)
from orchestrator_service.client import OrchestratorClient
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb

# projects and sites ---------------------------------------------------------------------------


@cli.group()
def projects() -> None:
    """Create, list or show projects."""


def _print_project(p: pb.Project, json_output: bool = False) -> None:
    if json_output:
        print(as_json(p))
        return
    print(f"Project {p.id}: {p.name}")
    print(f"  main keyword:     {p.main_keyword}")
    print(f"  entities:         {', '.join(p.entities) or '-'}")
    print(f"  related searches: {', '.join(p.related_searches) or '-'}")
    print(f"  money site:       {p.money_site_url or '-'}")


@projects.command("create")
@click.option(
    "-f",
    "--file",
    "project_file",
    type=click.Path(dir_okay=False),
    help="Project file: the job file's `project` object as JSON.",
)
@click.option("--name", default="", help="Unique project name.")
@click.option("--keyword", default="", help="Main keyword.")
@click.option("--entity", multiple=True, help="An entity (repeat for more).")
@click.option("--related", multiple=True, help="A related search (repeat for more).")
@click.option("--money-site-url", default="", help="The site tier-1 articles link to.")
@json_option
@connection_options
def projects_create(
    connection: Connection,
    project_file: str | None,
    name: str,
    keyword: str,
    entity: tuple[str, ...],
    related: tuple[str, ...],
    money_site_url: str,
    as_json_output: bool,
) -> int:
    """Create a project from a project file or from flags.

    \b
    Examples:
      tierwriter projects create --name lathes --keyword "cnc lathe" --entity chuck
      tierwriter projects create -f project.json
    """
    if project_file:
        try:
            project_json = Path(project_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            print(f"Error: cannot read project file {project_file}: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    elif name and keyword:
        project_json = json.dumps(
            {
                "name": name,
                "main_keyword": keyword,
                "entities": list(entity),
                "related_searches": list(related),
                "money_site_url": money_site_url,
            }
        )
    else:
        print("Error: give -f PROJECT_FILE, or --name and --keyword", file=sys.stderr)
        return EXIT_BAD_INPUT

    def create(client: OrchestratorClient) -> int:
        _print_project(client.create_project(project_json), as_json_output)
        return EXIT_OK

    return connection.run(create)


@projects.command("list")
@json_option
@connection_options
def projects_list(connection: Connection, as_json_output: bool) -> int:
    """Projects (yours; an admin's: everyone's)."""

    def listing(client: OrchestratorClient) -> int:
        found = client.list_projects()
        if as_json_output:
            print(as_json(pb.ListProjectsResponse(projects=found)))
            return EXIT_OK
        print(f"{'ID':>6}  {'name':<32} {'main keyword':<32} money site")
        for p in found:
            print(f"{p.id:>6}  {p.name[:32]:<32} {p.main_keyword[:32]:<32} {p.money_site_url}")
        return EXIT_OK

    return connection.run(listing)


@projects.command("show")
@click.argument("project")
@json_option
@connection_options
def projects_show(connection: Connection, project: str, as_json_output: bool) -> int:
    """One project, by id or name."""

    def show(client: OrchestratorClient) -> int:
        found = (
            client.get_project(project_id=int(project))
            if project.isdigit()
            else client.get_project(name=project)
        )
        _print_project(found, as_json_output)
        return EXIT_OK

    return connection.run(show)


@cli.group()
def sites() -> None:
    """List your sites, or give one to another user (admins).

    A site belongs to the user whose job first named it; another user's job file naming it is
    refused."""


@sites.command("list")
@json_option
@connection_options
def sites_list(connection: Connection, as_json_output: bool) -> int:
    """Your sites (an admin's: everyone's) with their owners and template sets."""

    def listing(client: OrchestratorClient) -> int:
        found = client.list_sites()
        if as_json_output:
            print(as_json(pb.ListSitesResponse(sites=found)))
            return EXIT_OK
        print(f"{'hostname':<40} {'owner':<20} template set")
        for site in found:
            print(f"{site.hostname:<40} {site.owner:<20} {site.template or '(default)'}")
        return EXIT_OK

    return connection.run(listing)


@sites.command("transfer")
@click.argument("hostname")
@click.argument("new_owner")
@connection_options
def sites_transfer(connection: Connection, hostname: str, new_owner: str) -> int:
    """Give a site to another user (admins only).

    \b
    Examples:
      tierwriter sites transfer blog.example.net ann
    """

    def transfer(client: OrchestratorClient) -> int:
        site = client.transfer_site(hostname, new_owner)
        print(f"{site.hostname} now belongs to {site.owner}.")
        return EXIT_OK

    return connection.run(transfer)


# users ----------------------------------------------------------------------------------------


@cli.group()
def users() -> None:
    """Create, list, disable, enable users, or set a password (admins)."""


def _new_password(username: str) -> str:
    """Asked twice on a terminal; otherwise the first line of standard input."""
    if interactive():
        password = getpass.getpass(f"New password for {username}: ")
        if password != getpass.getpass("Again: "):
            raise CliError("the two passwords differ; nothing was changed", EXIT_BAD_INPUT)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CliError("no new password given; nothing was changed", EXIT_BAD_INPUT)
    return password


def _user_row(u: pb.User) -> str:
    state = "active" if u.active else "disabled"
    return f"{u.username:<32} {u.role:<6} {state:<9} {utc(u.create_time)}"


@users.command("create")
@click.argument("username")
@click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True)
@connection_options
def users_create(connection: Connection, username: str, role: str) -> int:
    """Create a user.

    The password is asked twice on a terminal, else read from the first line of standard input.

    \b
    Example:
      printf '%s\\n' "$PASSWORD" | tierwriter users create ann --role user
    """
    password = _new_password(username)

    def create(client: OrchestratorClient) -> int:
        user = client.create_user(username, password, role)
        print(f"Created user {user.username} ({user.role}).")
        return EXIT_OK

    return connection.run(create)


@users.command("list")
@json_option
@connection_options
def users_list(connection: Connection, as_json_output: bool) -> int:
    """Every user."""

    def listing(client: OrchestratorClient) -> int:
        found = client.list_users()
        if as_json_output:
            print(as_json(pb.ListUsersResponse(users=found)))
            return EXIT_OK
        print(f"{'username':<32} {'role':<6} {'state':<9} created")
        for user in found:
            print(_user_row(user))
        return EXIT_OK

    return connection.run(listing)


def _set_active(connection: Connection, username: str, active: bool) -> int:
    def set_active(client: OrchestratorClient) -> int:
        user = client.set_user_active(username, active)
        done = "enabled" if user.active else "disabled: it can no longer log in or use a token"
        print(f"User {user.username} is {done}.")
        return EXIT_OK

    return connection.run(set_active)


@users.command("disable")
@click.argument("username")
@connection_options
def users_disable(connection: Connection, username: str) -> int:
    """Disable a user: no login, and their tokens stop working at once."""
    return _set_active(connection, username, False)


@users.command("enable")
@click.argument("username")
@connection_options
def users_enable(connection: Connection, username: str) -> int:
    """Enable a disabled user again."""
    return _set_active(connection, username, True)


@users.command("passwd")
@click.argument("username", required=False, default="")
@connection_options
def users_passwd(connection: Connection, username: str) -> int:
    """Set a password: yours by default; an admin may set anyone's.

    Asked twice on a terminal, else read from standard input.
    """
    username = username or connection.user
    if not username:
        try:
            saved = token_file.load(token_file.default_path(), connection.address)
        except token_file.TokenFileError:
            saved = None
        username = saved.username if saved else ""
    if not username:
        raise CliError("name the user whose password to set", EXIT_BAD_INPUT)
    password = _new_password(username)

    def passwd(client: OrchestratorClient) -> int:
        user = client.set_password(username, password)
        print(
            f"New password set for {user.username}; session tokens issued before it no longer "
            "work (log in again with the new password)."
        )
        return EXIT_OK

    return connection.run(passwd)


def _limit(n: int) -> str:
    return f"{n:,}" if n else "no limit"


@users.command("quota")
@click.argument("username", required=False, default="")
@click.option(
    "--default",
    "default_quota",
    is_flag=True,
    help="The default quota of users without one of their own.",
)
@click.option(
    "--articles",
    type=click.IntRange(min=0),
    help="Articles queued and running at once, at most (0: no limit).",
)
@click.option("--jobs", type=click.IntRange(min=0), help="Queued jobs at most (0: no limit).")
@click.option(
    "--clear", is_flag=True, help="Remove the user's own quota: the default applies again."
)
@json_option
@connection_options
def users_quota(
    connection: Connection,
    username: str,
    default_quota: bool,
    articles: int | None,
    jobs: int | None,
    clear: bool,
    as_json_output: bool,
) -> int:
    """Show or set a quota: how many articles (queued and running) and queued jobs a user may
    have at once. A job file past it is refused (exit 5) and nothing of it is stored.

    Without --articles, --jobs or --clear it shows the quota (yours, by default); setting one is
    for admins.

    \b
    Examples:
      tierwriter users quota                          # yours, and what you use of it
      tierwriter users quota ann --articles 5000 --jobs 20
      tierwriter users quota --default --articles 100000 --jobs 100
      tierwriter users quota ann --clear              # back to the default
    """
    if default_quota and username:
        raise CliError("name a user or give --default, not both", EXIT_BAD_INPUT)
    setting = clear or articles is not None or jobs is not None
    if clear and (articles is not None or jobs is not None):
        raise CliError(
            "--clear removes a quota: give it without --articles or --jobs", EXIT_BAD_INPUT
        )

    def quota(client: OrchestratorClient) -> int:
        who = username or ("" if default_quota else connection.user)
        if setting:
            if not who and not default_quota:
                raise CliError(
                    "name the user whose quota to set, or give --default", EXIT_BAD_INPUT
                )
            current = client.get_quota(who, default_quota).quota
            new = None
            if not clear:
                new = pb.Quota(
                    max_active_articles=current.max_active_articles
                    if articles is None
                    else articles,
                    max_queued_jobs=current.max_queued_jobs if jobs is None else jobs,
                )
            client.set_quota(who, new, default_quota)
        found = client.get_quota(who, default_quota)
        if as_json_output:
            print(as_json(found))
            return EXIT_OK
        q = found.quota
        # "Quota of ann", not "Ann's quota": a username keeps its case.
        whose = "Default quota" if default_quota else f"Quota of {found.username or 'you'}"
        if not default_quota and not found.own:
            whose += " (the default)"
        print(f"{whose}: {_limit(q.max_active_articles)} articles queued and "
              f"running, {_limit(q.max_queued_jobs)} queued jobs")  # fmt: skip
        if not default_quota:
            print(f"In use: {found.active_articles:,} articles, {found.queued_jobs} queued jobs")
        return EXIT_OK

    return connection.run(quota)
