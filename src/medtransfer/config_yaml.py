"""The YAML reader of params files: PyYAML's SafeLoader, bounded before any Python object is built.

Aliases share one composed node, so a kilobyte of nested anchors (a "billion laughs") composes cheaply but expands
into billions of values as soon as anything walks it: a repr in an error message, a JSON dump to MLflow. Deep
nesting overflows the recursive composer and every recursive walk after it. So while composing, each node's
expanded size (an alias counts the full size of what it stands for) and height are tallied from its children's,
and the document is refused once either passes a bound no real params file comes near. The refusal comes before
construction, in time and memory proportional to the file, not to its expansion.

Duplicate keys are refused too (YAML would silently keep the last), but a merge key (`<<: *base`) and a key that
overrides one it merged are not duplicates: YAML specifies that the mapping's own key wins.
"""

from __future__ import annotations

from typing import Any

import yaml

from medtransfer.errors import ConfigError

#: Values (scalars, lists, mappings) of the whole document once every alias is expanded; the shipped profiles hold
#: a few hundred.
MAX_EXPANDED_NODES = 200_000
#: Levels of nesting, aliases expanded; the schema itself needs about six.
MAX_DEPTH = 100

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that bounds expansion and depth while composing, and refuses duplicate keys."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        # id(node) -> (expanded size, height), for every node composed so far; aliases look their anchor up here.
        self._measures: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._measures:  # the anchor is still open: the alias sits inside what it names
                raise ConfigError(f"an alias at line {mark.line + 1} refers to a node that contains it",
                                  fix="a params file cannot be recursive; write the value out")
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _too_deep(self.peek_event().start_mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> None:
        """Tally `node` from its children, which are composed (and measured) before it; refuse past the bounds."""
        if isinstance(node, yaml.ScalarNode):
            children: list[yaml.Node] = []
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = [child for pair in node.value for child in pair]
        sizes = [self._measures[id(child)] for child in children]
        size = 1 + sum(size for size, _ in sizes)
        height = 1 + max((height for _, height in sizes), default=0)
        if size > MAX_EXPANDED_NODES:
            raise ConfigError(
                f"the value at line {node.start_mark.line + 1} expands to more than {MAX_EXPANDED_NODES:,} values "
                "(aliases of aliases multiply)",
                fix="write the values out or use fewer nested aliases (&anchor / *alias)")
        if height > MAX_DEPTH:
            raise _too_deep(node.start_mark)
        self._measures[id(node)] = (size, height)


def _too_deep(mark: yaml.Mark) -> ConfigError:
    return ConfigError(f"values nest more than {MAX_DEPTH} levels deep (aliases expanded) at line {mark.line + 1}",
                       fix="flatten the structure; a params file needs a handful of levels")


def _construct_mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    # Only the mapping's own keys can clash; keys it merges in (`<<`) may be overridden by them, as YAML specifies.
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: SafeConstructor refuses it with its own YAML error below
            continue
        if duplicate:
            raise ConfigError(
                f"duplicate key '{key}' at line {key_node.start_mark.line + 1}",
                fix="each name may appear once per section; rename or remove one",
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)
