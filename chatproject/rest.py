"""DRF's JSON parser and renderer for input theirs answer with a 500, string fields that take
strings only, the API's 404, and the Link header of a list's pages."""

from django.http import JsonResponse, QueryDict
from django.utils.encoding import escape_uri_path
from django.views import defaults
from rest_framework import parsers, renderers, serializers
from rest_framework.exceptions import NotFound, ParseError


class JSONParser(parsers.JSONParser):
    """DRF's, with JSON nested deeper than the interpreter's recursion limit (2 KB of
    brackets) refused like any other malformed JSON: DRF catches ValueError only, and the json
    module raises RecursionError, which reached the client as a 500 and a logged traceback."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None


_NOT_A_STRING = serializers.CharField.default_error_messages["invalid"]


class StringField(serializers.CharField):
    """A CharField that takes a JSON string only: DRF's reads a number as its digits (5 as "5"),
    where the socket refuses a `message` whose body or client_id is not a string. Every free
    text the API reads is one: a name, a title, a reason, a room, a token."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            # CharField's own words and code, whatever a subclass calls `invalid` (a pattern).
            raise serializers.ValidationError(_NOT_A_STRING, code="invalid")
        return super().to_internal_value(data)


class StringRegexField(StringField, serializers.RegexField):
    """A RegexField that takes a JSON string only (a slug)."""


class JSONRenderer(renderers.JSONRenderer):
    """DRF's (UTF-8), except for an answer that holds a lone surrogate - an error quoting what
    the client sent (`"\\ud800" is not a valid choice.`), which cannot be encoded as UTF-8 and
    was a 500: that one is written with JSON's `\\u` escapes."""

    def render(self, data, accepted_media_type=None, renderer_context=None):
        try:
            return super().render(data, accepted_media_type, renderer_context)
        except UnicodeEncodeError:
            self.ensure_ascii = True
            return super().render(data, accepted_media_type, renderer_context)


def link_next(request, *, after: str | None) -> dict[str, str]:
    """The headers of a list page: `Link: <...>; rel="next"` (RFC 8288) naming the same query
    with `after` moved on, or nothing on the last page. The link is a path, resolved against
    the request's own URL, so it holds behind any proxy."""
    if after is None:
        return {}
    query = request.GET.copy() if request.GET else QueryDict(mutable=True)
    query["after"] = after
    return {"Link": f'<{escape_uri_path(request.path)}?{query.urlencode()}>; rel="next"'}


def page_not_found(request, exception):
    """Django's 404 page, but for /api/ the API's own error shape (docs/protocol.md): a path
    its routes refuse (a seq beyond the largest, a malformed slug) is a 404 of the API too."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"detail": str(NotFound.default_detail), "code": "not_found"}, status=404
        )
    return defaults.page_not_found(request, exception)
