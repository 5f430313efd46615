// JSON requests to the chat's REST API with the session cookie and the CSRF token.

export class ApiError extends Error {
  constructor(status, data, retryAfter) {
    super(describe(status, data));
    this.status = status; // 0: the request never reached the server
    this.data = data;
    this.retryAfter = retryAfter; // seconds, from a 429's Retry-After header
  }
}

// The cookie is read on every call: signing in in another tab rotates the token.
function csrfToken() {
  const cookie = document.cookie.split("; ").find((c) => c.startsWith("csrftoken="));
  if (cookie) return decodeURIComponent(cookie.slice("csrftoken=".length));
  return document.querySelector('meta[name="csrf-token"]')?.content ?? "";
}

// Whose page this is. The session may be someone else's by now (signed out in another tab, and
// in again as them): the server refuses a request whose page names another user.
const PAGE_USER = document.querySelector('meta[name="chat-user"]')?.content;

export async function api(path, options = {}) {
  return (await request(path, options)).data;
}

// One page of a list the API gives in pages (rooms, members): its items, and the path of the
// next page (its `Link: <...>; rel="next"`), or null on the last.
export async function apiPage(path) {
  const { data, response } = await request(path);
  return { items: data, next: nextLink(response.headers.get("Link")) };
}

function nextLink(header) {
  const match = /<([^>]*)>\s*;\s*rel="?next"?/.exec(header ?? "");
  // Only a path of this site: the server sends one, and a page follows nothing else.
  return match && match[1].startsWith("/") && !match[1].startsWith("//") ? match[1] : null;
}

async function request(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (PAGE_USER) headers["X-Chat-User"] = encodeURIComponent(PAGE_USER);
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRFToken"] = csrfToken();
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, null, null);
  }
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const retryAfter = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
    throw new ApiError(response.status, data, Number.isNaN(retryAfter) ? null : retryAfter);
  }
  return { data, response };
}

// A sentence for people from the API's error answer: {"detail", "code"}, and for a refused
// request every field's errors in `errors` (docs/protocol.md), all of which are shown.
function describe(status, data) {
  if (status === 0) return "The server could not be reached. Check your connection.";
  const fields = data && typeof data.errors === "object" && data.errors;
  if (!fields && data && typeof data.detail === "string") return sentence(data.detail);
  if (fields) {
    const parts = Object.entries(fields).map(([field, errors]) => {
      const text = messages(errors).join(" ");
      return field === "non_field_errors" ? text : `${field}: ${text}`;
    });
    if (parts.length) return parts.join(" ");
  }
  return `The server answered ${status}. Please try again.`;
}

// The texts of one field's errors: a list of them, or (a nested serializer) lists by field.
function messages(errors) {
  if (Array.isArray(errors)) return errors.flatMap(messages);
  if (errors && typeof errors === "object") return Object.values(errors).flatMap(messages);
  return [String(errors)];
}

function sentence(text) {
  const trimmed = text.trim();
  if (!trimmed) return trimmed;
  const capital = trimmed[0].toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}
