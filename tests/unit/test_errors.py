import pytest
import trio

from tunneld.errors import BackendError, ConfigError, principal_error


async def test_a_tunneld_error_raised_in_a_nursery_is_found_through_the_group() -> None:
    async def sleeper() -> None:
        await trio.sleep_forever()

    async def failer() -> None:
        raise BackendError("wireguard-go exited")

    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            nursery.start_soon(failer)
    error = principal_error(caught.value)
    assert isinstance(error, BackendError)
    assert str(error) == "wireguard-go exited"


def test_nested_groups_and_plain_errors() -> None:
    config_error = ConfigError(["a", "b"])
    assert principal_error(config_error) is config_error
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [config_error])])
    assert principal_error(nested) is config_error
    assert config_error.exit_code == 2


def test_a_foreign_exception_in_the_group_is_not_hidden() -> None:
    group = ExceptionGroup("mixed", [BackendError("x"), ZeroDivisionError()])
    assert principal_error(group) is None
    assert principal_error(ValueError()) is None
