"""YAML from a user (--config files, KEY=VALUE values), read strictly: plain data only, no aliases
(a few hundred bytes of nested aliases expand to gigabytes), no key given twice (YAML would keep the
last one silently), bounded nesting; and values shown in messages clipped to a line."""
import reprlib

import yaml

from nformer_reid.utils.errors import ReIDInputError, one_line

MAX_DEPTH = 64  # nesting levels of lists / mappings: options hold scalars and short lists
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxlevel = \
    60, 60, 6, 6, 6, 3


def short(value) -> str:
    """repr(value) clipped for a one-line message."""
    return _SHORT.repr(value)


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {short(key)} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(stream, where: str, what: str = "not valid YAML"):
    """yaml.safe_load(stream) with the limits above; ReIDInputError "<where>: <what>: <reason>" otherwise."""
    try:
        return yaml.load(stream, Loader=_StrictLoader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        reason = one_line(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise ReIDInputError(f"{where}: {what}: {reason[:200]}") from None
