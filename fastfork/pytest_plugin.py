"""pytest plugin: fastfork services as fixtures.

Installed with fastfork (the ``pytest11`` entry point; ``-p fastfork.pytest_plugin``
loads it from a source tree, ``-p no:fastfork.pytest_plugin`` turns it off).

``fastfork_service`` is a factory: call it with the arguments of
``fastfork.service`` and it returns the started, ready ``Service``. It can be
requested by a fixture of any scope; each service stops when the fixture that
started it is torn down (the end of that fixture's scope), or, started by a
test itself, at the end of that test::

    @pytest.fixture(scope="session")
    def server(fastfork_service):
        port = fastfork.ready.free_port()
        fastfork_service(serve, port, ready=fastfork.ready.port(port))
        return f"http://127.0.0.1:{port}"

When a test fails, the output of the services it used (started by it or by
the fixtures it requested) is attached to its report. A service found dead
after a test phase, without having been stopped, is reported on that test
and in the terminal summary. Ctrl-C (or any end of the session) stops every
service. Under pytest-xdist each worker runs its own services: give each its
port from ``fastfork.ready.free_port()``.
"""
import pytest

__all__ = ["fastfork_service"]

# Report sections this plugin adds start with this; "died" ones end with _DIED.
_SECTION = "fastfork service "
_DIED = " died"
_OUTPUT_LINES = 100

_plugin_key = pytest.StashKey()


class _Started:
    """A service the factory started, and who started it."""

    def __init__(self, service, fixturename, item):
        self.service = service
        self.fixturename = fixturename  # the fixture that started it, or None
        self.item = item                # the test running when it started, or None
        self.death_reported = False


class _ServicesPlugin:
    """The plugin's state, one per pytest process (each xdist worker has its own)."""

    def __init__(self):
        self.setting_up = []   # requests of the fixtures being set up, innermost last
        self.item = None       # the test being run
        self.live = []         # _Started, not stopped yet
        self.of_item = []      # _Started during the current test (kept for its reports)
        self.deaths = []       # (where, text) for the terminal summary

    # ------------------------------------------------------------ the factory

    def start(self, target, /, *args, **options):
        """Start a service like ``fastfork.service`` and wait until it is ready; return it."""
        from fastfork.services import service

        svc = service(target, *args, **options)
        request = self.setting_up[-1] if self.setting_up else None
        started = _Started(svc, None if request is None else request.fixturename, self.item)
        self.live.append(started)
        if self.item is not None:
            self.of_item.append(started)
        if request is not None:
            request.addfinalizer(lambda: self._stop(started))
        elif self.item is not None:
            self.item.addfinalizer(lambda: self._stop(started))
        # else: started outside any fixture or test; stopped when the session ends
        try:
            return svc.start()
        except BaseException:
            self._stop(started)
            raise

    def _stop(self, started):
        if started in self.live:
            self.live.remove(started)
            started.service.stop()

    def stop_all(self):
        while self.live:
            self._stop(self.live[-1])

    def used_by(self, item):
        """The services ``item`` used: started during it, or by fixtures it requested."""
        used = list(self.of_item) if item is self.item else []
        used += [s for s in self.live if s.fixturename in item.fixturenames and s not in used]
        return used

    # ------------------------------------------------------------ hooks

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        self.setting_up.append(request)
        try:
            yield
        finally:
            self.setting_up.pop()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.item = item
        try:
            yield
        finally:
            self.item = None
            self.of_item = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        for started in self.used_by(item):
            svc = started.service
            if not started.death_reported and svc.died:
                started.death_reported = True
                report.sections.append((f"{_SECTION}{svc.name}{_DIED}", _describe_death(svc)))
            elif report.failed:
                report.sections.append((f"{_SECTION}{svc.name} output", _output_of(svc)))

    def pytest_runtest_logreport(self, report):
        # Here, not in makereport: under xdist the reports of the workers arrive here.
        for title, text in report.sections:
            if title.startswith(_SECTION) and title.endswith(_DIED):
                self.deaths.append((f"{report.nodeid} ({report.when})",
                                    text.partition("\n")[0]))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        # After the fixtures' teardown (which stops their services): what is left.
        for started in self.live:
            if not started.death_reported and started.service.died:
                started.death_reported = True
                self.deaths.append(("after the last test",
                                    _describe_death(started.service).partition("\n")[0]))
        self.stop_all()

    def pytest_unconfigure(self, config):
        self.stop_all()

    def pytest_terminal_summary(self, terminalreporter):
        if not self.deaths:
            return
        terminalreporter.write_sep("=", "fastfork services that died")
        for where, text in self.deaths:
            terminalreporter.write_line(f"{text} -- noticed in {where}")


def _describe_death(svc):
    from fastfork.errors import describe_status

    return (f"service {svc.name!r} (pid {svc.pid}) {describe_status(svc.returncode)} "
            f"without being stopped\n{_output_of(svc)}")


def _output_of(svc):
    lines = svc.tail(_OUTPUT_LINES + 1).splitlines()
    if not lines:
        return "(no output)"
    if len(lines) > _OUTPUT_LINES:
        lines[0] = f"(the last {_OUTPUT_LINES} lines)"
    return "\n".join(lines)


def pytest_configure(config):
    plugin = _ServicesPlugin()
    config.stash[_plugin_key] = plugin
    config.pluginmanager.register(plugin, "fastfork-services")


@pytest.fixture(scope="session")
def fastfork_service(pytestconfig):
    """Start a fastfork.service (same arguments); returns the ready Service.

    It stops when the fixture that called this factory is torn down, or at
    the end of the test that called it.
    """
    return pytestconfig.stash[_plugin_key].start
